"""Rotary position embedding (HF's rotate-half convention), in place on q and k, one kernel.

One program handles one token: it gathers the token's cos/sin rows (`[max_pos, D]` tables, each
row `cat(freqs, freqs)`-shaped, read as two halves so any table works) and rotates every head of
q and then of k, as `[heads, D/2]` tiles of the two halves:

    out[:D/2] = x[:D/2] * cos[:D/2] - x[D/2:] * sin[:D/2]
    out[D/2:] = x[D/2:] * cos[D/2:] + x[:D/2] * sin[D/2:]

q and k may be strided views (a fused qkv output split and viewed as `[T, H, D]`): only the last
dim must be contiguous.

Rounding: the reference (our engine's torch code) casts cos/sin to q's dtype and computes
`q * cos + rotate_half(q) * sin` in that dtype, i.e. each product and the sum are rounded to it.
The kernel does exactly those roundings (cos/sin rounded to q's dtype; each product formed in fp32,
where the product of two bf16/fp16 values is exact, and rounded; the sum formed in fp32 and
rounded), with FMA contraction off, so in every dtype it matches the reference bit for bit.

Positions are not bounds-checked on the device: each must be in `[0, cos.shape[0])`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate_heads(x_ptr, stride_h, c1, c2, s1, s2, d, dmask,
                  NUM_HEADS: tl.constexpr, HEADS_PAD: tl.constexpr, HALF: tl.constexpr):
    heads = tl.arange(0, HEADS_PAD)
    offs = heads[:, None] * stride_h + d[None, :]  # [HEADS_PAD, HALF_PAD], first half
    mask = (heads[:, None] < NUM_HEADS) & dmask[None, :]
    dt = x_ptr.dtype.element_ty
    x1 = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + offs + HALF, mask=mask, other=0.0).to(tl.float32)
    # Each product and the sum rounded to x's dtype, as torch's q * cos + rotate_half(q) * sin is.
    o1 = ((x1 * c1[None, :]).to(dt).to(tl.float32) - (x2 * s1[None, :]).to(dt).to(tl.float32)).to(dt)
    o2 = ((x2 * c2[None, :]).to(dt).to(tl.float32) + (x1 * s2[None, :]).to(dt).to(tl.float32)).to(dt)
    tl.store(x_ptr + offs, o1, mask=mask)
    tl.store(x_ptr + offs + HALF, o2, mask=mask)


@triton.jit
def _rotary_kernel(
    pos_ptr,  # [T] int64
    q_ptr,  # [T, HQ, D], strides (stride_qt, stride_qh, 1)
    k_ptr,  # [T, HK, D], strides (stride_kt, stride_kh, 1)
    cos_ptr,  # [max_pos, D], row stride stride_cos
    sin_ptr,  # [max_pos, D], row stride stride_sin
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_cos,
    stride_sin,
    HQ: tl.constexpr,
    HQ_PAD: tl.constexpr,
    HK: tl.constexpr,
    HK_PAD: tl.constexpr,
    HALF: tl.constexpr,  # head_dim // 2
    HALF_PAD: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + token)
    d = tl.arange(0, HALF_PAD)
    dmask = d < HALF
    dt = q_ptr.dtype.element_ty
    # cos/sin rounded to q's dtype first (the reference's `.to(q.dtype)`), then used in fp32.
    c1 = tl.load(cos_ptr + pos * stride_cos + d, mask=dmask, other=0.0).to(dt).to(tl.float32)
    c2 = tl.load(cos_ptr + pos * stride_cos + HALF + d, mask=dmask, other=0.0).to(dt).to(tl.float32)
    s1 = tl.load(sin_ptr + pos * stride_sin + d, mask=dmask, other=0.0).to(dt).to(tl.float32)
    s2 = tl.load(sin_ptr + pos * stride_sin + HALF + d, mask=dmask, other=0.0).to(dt).to(tl.float32)
    _rotate_heads(q_ptr + token * stride_qt, stride_qh, c1, c2, s1, s2, d, dmask, HQ, HQ_PAD, HALF)
    _rotate_heads(k_ptr + token * stride_kt, stride_kh, c1, c2, s1, s2, d, dmask, HK, HK_PAD, HALF)


def apply_rotary(
    positions: torch.Tensor,  # [T] int64
    q: torch.Tensor,  # [T, Hq, D]; last dim contiguous; rotated in place
    k: torch.Tensor,  # [T, Hk, D]; same dtype as q; last dim contiguous; rotated in place
    cos: torch.Tensor,  # [max_pos, D] (fp32 in the engine); last dim contiguous
    sin: torch.Tensor,  # [max_pos, D]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotates q and k in place and returns them."""
    assert positions.dtype == torch.int64 and positions.dim() == 1, (positions.dtype, tuple(positions.shape))
    assert q.dim() == 3 and k.dim() == 3, (tuple(q.shape), tuple(k.shape))
    num_tokens, num_heads, head_dim = q.shape
    assert positions.shape[0] == num_tokens and k.shape[0] == num_tokens, (
        tuple(positions.shape), tuple(q.shape), tuple(k.shape))
    assert k.shape[2] == head_dim and head_dim % 2 == 0, (tuple(q.shape), tuple(k.shape))
    assert q.dtype == k.dtype and q.dtype.is_floating_point, (q.dtype, k.dtype)
    assert q.stride(2) == 1 and k.stride(2) == 1, (q.stride(), k.stride())
    assert cos.dim() == 2 and cos.shape == sin.shape and cos.shape[1] == head_dim, (
        tuple(cos.shape), tuple(sin.shape), head_dim)
    assert cos.stride(1) == 1 and sin.stride(1) == 1, (cos.stride(), sin.stride())
    assert cos.dtype.is_floating_point and sin.dtype.is_floating_point, (cos.dtype, sin.dtype)
    assert len({positions.device, q.device, k.device, cos.device, sin.device}) == 1
    if num_tokens == 0:
        return q, k
    positions = positions.contiguous()
    half = head_dim // 2
    half_pad = triton.next_power_of_2(half)
    tile = (triton.next_power_of_2(num_heads) + triton.next_power_of_2(k.shape[1])) * half_pad
    _rotary_kernel[(num_tokens,)](
        positions, q, k, cos, sin,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0), sin.stride(0),
        HQ=num_heads, HQ_PAD=triton.next_power_of_2(num_heads),
        HK=k.shape[1], HK_PAD=triton.next_power_of_2(k.shape[1]),
        HALF=half, HALF_PAD=half_pad,
        num_warps=4 if tile >= 2048 else 2 if tile >= 512 else 1,
        # No FMA contraction: it would fuse a product into the sum and skip the product's rounding
        # (`fma.rn.bf16` in the PTX), breaking the bit-for-bit match with the reference.
        enable_fp_fusion=False,
    )
    return q, k


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_ref(positions, q, k, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
    """New tensors; what engine/models/llama.py's RotaryEmbedding.forward computes."""
    c = cos[positions].unsqueeze(1).to(q.dtype)  # [T, 1, D]
    s = sin[positions].unsqueeze(1).to(q.dtype)
    return q * c + _rotate_half(q) * s, k * c + _rotate_half(k) * s


def rotary_bytes(num_tokens: int, num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 table_dtype: torch.dtype = torch.float32) -> int:
    """The floor: read and write q and k once, read one cos and one sin row per token."""
    qk = 2 * num_tokens * (num_heads + num_kv_heads) * head_dim * torch.finfo(dtype).bits // 8
    return qk + 2 * num_tokens * head_dim * torch.finfo(table_dtype).bits // 8


if __name__ == "__main__":
    # python -m kernels.rotary  (CUDA)
    torch.manual_seed(0)
    hq, hk, d, dt = 32, 8, 128, torch.bfloat16
    inv = 1.0 / 500000.0 ** (torch.arange(0, d, 2, dtype=torch.float, device="cuda") / d)
    freqs = torch.arange(131072, dtype=torch.float, device="cuda")[:, None] * inv[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos_t, sin_t = emb.cos(), emb.sin()
    for n in (1, 256, 8192):
        qkv = torch.randn(n, (hq + 2 * hk) * d, dtype=dt, device="cuda")
        q = qkv[:, : hq * d].view(n, hq, d)
        k = qkv[:, hq * d : (hq + hk) * d].view(n, hk, d)
        pos = torch.randint(0, 131072, (n,), device="cuda")
        ms = triton.testing.do_bench(lambda pos=pos, q=q, k=k: apply_rotary(pos, q, k, cos_t, sin_t))
        print(f"tokens {n:5d}: {ms * 1e3:7.1f} us {rotary_bytes(n, hq, hk, d, dt) / ms / 1e9:5.2f} TB/s")
