"""Which layer imports what: the router's and the gateway's modules import neither torch nor the
model code (at run time the router process blocks torch: tests/services/test_router_no_torch.py),
and the gRPC plumbing (engine/rpc) imports nothing above it. Each check
imports in a fresh interpreter, so modules this test process already loaded cannot hide an import."""
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]

ROUTER_AND_GATEWAY = ["router.__main__", "router.cli", "router.servicer", "router.pipeline", "router.prompts",
                      "router.registry", "router.policy", "gateway.app", "gateway.__main__", "gateway.protocol"]
PLUMBING = ["engine.rpc.channel", "engine.rpc.convert", "engine.rpc.errors", "engine.rpc.process",
            "engine.rpc.reflection", "engine.rpc.security", "engine.rpc.server"]
MODEL_CODE = ["torch", "engine.llm_engine", "engine.loader", "engine.model_runner", "engine.models", "engine.config",
              "engine.gguf_loader"]
ABOVE_PLUMBING = MODEL_CODE + ["engine.kv_transfer", "engine.node", "engine.async_engine"]


def loaded_after_import(modules: list[str], watched: list[str]) -> list[str]:
    code = (f"import importlib, sys\nfor m in {modules!r}: importlib.import_module(m)\n"
            f"print(','.join(w for w in {watched!r} if w in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True,
                         cwd=ROOT)
    return [w for w in out.stdout.strip().split(",") if w]


def test_router_and_gateway_import_no_torch_and_no_model_code():
    assert loaded_after_import(ROUTER_AND_GATEWAY, MODEL_CODE) == []


def test_rpc_plumbing_imports_nothing_above_it():
    # One interpreter for all of them: what the union loads bounds what each one loads.
    assert loaded_after_import(PLUMBING, ABOVE_PLUMBING) == []
