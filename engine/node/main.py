"""What `python -m prefill_node` and `python -m decode_node` share: flags, model loading with health
NOT_SERVING until the warm-up (every kernel shape class once, `--warmup`) and a probe generation
worked, startup time logged, READY line, signals, drain, fatal engine errors,
optional registration with a router.

A node servicer implements `attach(engine, ns)`, `probe()`, `load_proto()`, `layout_proto()`,
`drain()` and `close()`; `serve_node()` does the rest.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from typing import Callable

from engine.async_engine import AsyncEngine
from engine.cli_args import add_engine_args, add_flag, engine_args_from
from engine.metrics import add_metrics_flags
from engine.rpc.process import announce_ready, die_with_parent, stop_signals
from engine.rpc.security import Security, add_security_args
from engine.rpc.server import build_server, run
from engine.warmup import warm_up

logger = logging.getLogger("pdserve.node")


def node_parser(role: str, default_port: int) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python -m {role}_node",
                                     description=f"pdserve {role} node (gRPC pdserve.v1.{role.capitalize()}Node)")
    add_engine_args(parser, default_port=default_port)
    g = parser.add_argument_group("node")
    add_flag(g, "--node-id", default=None, help="stable node id (default: <role>-<host>:<port>)")
    add_flag(g, "--advertise-host", default=None,
             help="host other nodes use to reach this one (default: --host, or the hostname when --host is 0.0.0.0)")
    add_flag(g, "--router", default=None, help="host:port of a router to register with (optional)")
    add_flag(g, "--shutdown-grace", type=float, default=10.0,
             help="seconds in-flight requests get to finish on SIGTERM")
    add_metrics_flags(g)
    add_flag(g, "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="log level")
    add_security_args(parser)
    return parser


def advertised_host(ns) -> str:
    if ns.advertise_host:
        return ns.advertise_host
    if ns.host in ("0.0.0.0", "::", ""):
        import socket
        return socket.gethostname()
    return ns.host


async def serve_node(role: str, ns: argparse.Namespace, servicer, add_fn: Callable) -> int:
    from engine.llm_engine import LLMEngine

    die_with_parent()
    loop = asyncio.get_running_loop()
    stop = stop_signals(loop)
    fatal: list[BaseException] = []

    def on_fatal(exc: BaseException) -> None:
        fatal.append(exc)
        stop.set()

    security = Security.from_args(ns)
    key_check = security.node_key_interceptor()
    server = build_server([(add_fn, servicer)], port=ns.port, host=ns.host, interceptors=[key_check] if key_check else (),
                          credentials=security.server_credentials())
    await server.start()  # health NOT_SERVING while the model loads
    ns.node_id = ns.node_id or f"{role}-{advertised_host(ns)}:{server.port}"
    ns.advertised_address = f"{advertised_host(ns)}:{server.port}"
    ns.kv_host = advertised_host(ns)  # where this node's torch.distributed endpoints listen
    engine = None
    try:
        t0 = time.monotonic()
        llm = await loop.run_in_executor(None, LLMEngine, engine_args_from(ns, role))
        loaded = time.monotonic()
        # Every kernel shape class once, before SERVING (engine/warmup.py): no request pays a compile.
        try:
            warm = await loop.run_in_executor(None, warm_up, llm, getattr(ns, "warmup", "auto"))
        except BaseException:
            llm.close()  # its tensor-parallel ranks, if any
            raise
        engine = AsyncEngine(llm, on_fatal=on_fatal, name=f"{role}-engine")
        engine.start()
        servicer.attach(engine, ns)
        servicer.request_stop = stop.set  # a Drain RPC ends the node like SIGTERM
        await servicer.probe()
        servicer.startup_seconds = time.monotonic() - t0
        logger.info("startup: engine built in %.2f s, %s; SERVING after %.2f s", loaded - t0, warm.line(),
                    servicer.startup_seconds)
        if ns.metrics_port is not None:
            from engine.metrics import export_node_metrics
            metrics_task = loop.create_task(export_node_metrics(servicer, role, ns.metrics_port, ns.host,
                                                                  prefix=ns.metrics_prefix))  # noqa: F841
        await server.set_serving(True)
        announce_ready(server.address)
        registration = loop.create_task(_register_forever(role, ns, servicer, stop)) if ns.router else None
        await stop.wait()
        if registration is not None:
            registration.cancel()
        await server.set_serving(False)
        if not fatal:
            await servicer.drain(ns.shutdown_grace)
        await server.stop(0.5 if fatal else ns.shutdown_grace)
    finally:
        await servicer.close()
        if engine is not None:
            await engine.stop()
    if fatal:
        logger.critical("exiting after an engine failure: %s", type(fatal[0]).__name__)
        return 1
    return 0


async def _register_forever(role: str, ns, servicer, stop: asyncio.Event) -> None:
    """Registers with the router and sends heartbeats; re-registers when the router forgot us."""
    from engine.rpc.channel import aio_channel
    from protos.pdserve.v1 import router_pb2, router_pb2_grpc
    import grpc

    interval = 2.0
    registered = False
    failures = 0  # calls in a row the router did not answer (it may still be starting: pdserve serve)
    async with aio_channel(ns.router, security=Security.from_args(ns).client) as channel:
        stub = router_pb2_grpc.RouterControlStub(channel)
        while not stop.is_set():
            try:
                load = await servicer.load_proto()
                if not registered:
                    reply = await stub.Register(router_pb2.RegisterNodeRequest(
                        node_id=ns.node_id, address=ns.advertised_address, role=role, layout=servicer.layout_proto(),
                        load=load, model=servicer.model_name, max_model_len=servicer.max_model_len,
                        dtype=servicer.resolved.dtype_name), timeout=5.0)
                    registered = reply.accepted
                else:
                    reply = await stub.Heartbeat(router_pb2.HeartbeatRequest(node_id=ns.node_id, load=load,
                                                                             serving=True), timeout=5.0)
                    registered = reply.known
                interval = max(0.2, (reply.heartbeat_interval_ms or 2000) / 1000.0 / 2)
                failures = 0
            except grpc.aio.AioRpcError as exc:
                failures += 1
                starting = exc.code() == grpc.StatusCode.UNAVAILABLE and not registered and failures < 10
                (logger.info if starting else logger.warning)(
                    "router %s: %s%s", ns.router, exc.code().name,
                    " (not up yet? retrying)" if starting else f": {(exc.details() or '')[:300]}")
                registered = False
                interval = 1.0
            except Exception:
                logger.exception("registration with the router failed")
                interval = 2.0
            try:
                await asyncio.wait_for(stop.wait(), interval)
            except asyncio.TimeoutError:
                pass


def main_for(role: str, default_port: int, make_servicer: Callable, add_fn: Callable, argv=None) -> int:
    ns = node_parser(role, default_port).parse_args(argv)
    logging.basicConfig(level=ns.log_level, stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s {role} %(name)s: %(message)s")
    return run(lambda: serve_node(role, ns, make_servicer(ns), add_fn))
