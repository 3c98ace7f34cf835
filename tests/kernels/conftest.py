"""Kernel tests run on CUDA when there is a GPU, else under Triton's interpreter on CPU tensors.

TRITON_INTERPRET is read when a `@triton.jit` function is defined (triton's own `tl.zeros` & co.
included, at `import triton`), so it is set here, before this directory's tests import triton or
`kernels.*`, and only on machines without CUDA, where no compiled Triton kernel can run anyway:
other test directories lose nothing.
"""
import os
import sys

import torch


def _drop_compiled_triton() -> None:
    # Another directory's tests imported triton (or our kernels) before this file ran: forget
    # those modules so the next import defines every jit function again, interpreted. The C
    # extension stays loaded; it is shared by both.
    import triton.language.standard as standard
    from triton.runtime.interpreter import InterpretedFunction

    if isinstance(standard.zeros, InterpretedFunction):
        return
    for name in list(sys.modules):
        top = name.split(".")[0]
        if (top == "triton" and not name.startswith("triton._C")) or top == "kernels" or name in (
            "engine.attention.triton_backend",
        ):
            del sys.modules[name]


if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
    if "triton" in sys.modules:
        _drop_compiled_triton()
