"""`python -m gateway --router host:port [--port 8000] [--api-key KEY ...] [--host 127.0.0.1]`

Serves the OpenAI-compatible HTTP API (uvicorn + uvloop) in front of a pdserve router, prints
`READY host:port` once the router answered and the port is listening, and on SIGTERM / SIGINT
(or when its parent process goes away) stops taking connections and lets in-flight requests
finish for up to --shutdown-grace seconds; SSE streams still open then end with an error event and
`data: [DONE]` (never a cut connection). A stream whose reader stops reading is aborted upstream and
its connection reset after --sse-stall-timeout seconds behind (gateway/sse_guard.py).
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import ssl
import sys

import uvicorn

from engine.cli_args import add_flag
from engine.rpc.process import announce_ready, die_with_parent
from engine.rpc.server import run
from engine.rpc.security import ClientSecurity
from engine.metrics import PREFIXES
from engine.tool_parsers import PARSERS
from gateway.app import BODY_TIMEOUT_S, MAX_BODY_BYTES, Settings, connect, create_app
from gateway.sse_guard import MAX_BACKLOG_BYTES, STALL_TIMEOUT_S, TransportScope

SHUTDOWN_SLACK_S = 5.0  # past the grace: for the streams' final events to get out before uvicorn cancels


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pdserve gateway",
                                description="OpenAI-compatible HTTP gateway onto a pdserve router.")
    add_flag(p, "--router", default="127.0.0.1:50051", help="host:port of the router's pdserve.v1.Generation")
    add_flag(p, "--host", default="127.0.0.1", help="HTTP listen address (0.0.0.0 to serve other hosts)")
    add_flag(p, "--port", type=int, default=8000, help="HTTP port (0 = any free port)")
    p.add_argument("--api-key", action="append", default=None,
                   help="accepted API key (`Authorization: Bearer KEY`), repeatable; every route but "
                        "/health needs one when any is set [env: PDSERVE_API_KEY, comma-separated]")
    add_flag(p, "--router-api-key", default=None,
             help="key the gateway presents to the router (default: the first --api-key)")
    add_flag(p, "--request-timeout", type=float, default=600.0,
             help="deadline of each generation call to the router, seconds (expiry -> HTTP 504)")
    add_flag(p, "--max-body-bytes", type=int, default=MAX_BODY_BYTES, help="largest request body (-> HTTP 413)")
    add_flag(p, "--router-wait", type=float, default=60.0,
             help="how long to wait at startup for the router to answer, seconds")
    add_flag(p, "--shutdown-grace", type=float, default=30.0,
             help="seconds in-flight requests may take to finish after SIGTERM; SSE streams still open then end "
                  "with an error event and [DONE]")
    add_flag(p, "--sse-stall-timeout", type=float, default=STALL_TIMEOUT_S,
             help="an SSE stream whose client stays --sse-max-backlog bytes behind (or whose write stays blocked) "
                  "this many seconds is aborted upstream and its connection reset")
    add_flag(p, "--sse-max-backlog", type=int, default=MAX_BACKLOG_BYTES,
             help="bytes of one SSE stream the client may leave unread (socket + write buffer) before the "
                  "--sse-stall-timeout clock runs")
    add_flag(p, "--body-timeout", type=float, default=BODY_TIMEOUT_S,
             help="seconds a request body may take to arrive (-> HTTP 408)")
    add_flag(p, "--tls-cert", default=None, help="PEM certificate: serve HTTPS (also our client certificate "
                                                 "towards a router that requires mTLS)")
    add_flag(p, "--tls-key", default=None, help="PEM private key of --tls-cert")
    add_flag(p, "--tls-client-ca", default=None, help="PEM CA bundle: HTTP clients must present a certificate it signed")
    add_flag(p, "--tls-ca", default=None, help="PEM CA bundle that verifies the router's certificate (TLS to the router)")
    add_flag(p, "--metrics-prefix", default="pdserve", choices=PREFIXES,
             help="metric name prefix: pdserve (pdserve:...) or vllm (vllm:..., for vLLM's dashboards and autoscaling rules)")
    add_flag(p, "--tool-call-parser", default=None, choices=sorted(PARSERS),
             help="parser of model output into OpenAI tool_calls (needed for tool_choice auto)")
    add_flag(p, "--log-level", default="warning", choices=["debug", "info", "warning", "error"],
             help="log level")
    return p


def api_keys(args: argparse.Namespace) -> tuple[str, ...]:
    keys = list(args.api_key or [])
    keys += [k.strip() for k in os.environ.get("PDSERVE_API_KEY", "").split(",") if k.strip()]
    return tuple(dict.fromkeys(keys))


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("pdserve")
    except Exception:
        return "0.1.0"


async def _serve(settings: Settings, args: argparse.Namespace) -> int:
    try:
        connected = await connect(settings, args.router_wait)
    except RuntimeError as exc:
        print(f"gateway: {exc}", file=sys.stderr, flush=True)
        return 1
    app = create_app(settings, connected=connected)
    server = uvicorn.Server(_uvicorn_config(TransportScope(app), args))
    task = asyncio.ensure_future(server.serve())
    while not server.started and not task.done():
        await asyncio.sleep(0.05)
    if not server.started:
        await task
        return 1
    host, port = server.servers[0].sockets[0].getsockname()[:2]
    announce_ready(f"{host}:{port}")
    parent = os.getppid()
    loop = asyncio.get_running_loop()
    stopping_since = None
    while not task.done():
        if os.getppid() != parent:  # parent died: shut down like on SIGTERM
            server.should_exit = True
        if server.should_exit and stopping_since is None:
            stopping_since = loop.time()
            logging.getLogger("pdserve.gateway").info("shutting down: %d streams open, grace %.1fs",
                                                      len(app.state.sse.streams), args.shutdown_grace)
        if stopping_since is not None and loop.time() - stopping_since >= args.shutdown_grace:
            if not app.state.sse.closing:
                ended = app.state.sse.end_all()
                logging.getLogger("pdserve.gateway").info("grace period over: ending %d streams", ended)
        await asyncio.wait({task}, timeout=0.1)
    await task
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    die_with_parent()  # `pdserve serve` spawns us without a preexec_fn (engine.rpc.process.spawn_env)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings(router=args.router, api_keys=api_keys(args), router_api_key=args.router_api_key,
                        request_timeout_s=args.request_timeout, max_body_bytes=args.max_body_bytes,
                        version=_version(), body_timeout_s=args.body_timeout,
                        tool_call_parser=args.tool_call_parser, metrics_prefix=args.metrics_prefix,
                        router_security=ClientSecurity(tls_ca=args.tls_ca, tls_cert=args.tls_cert,
                                                       tls_key=args.tls_key),
                        sse_stall_timeout_s=args.sse_stall_timeout, sse_max_backlog_bytes=args.sse_max_backlog)
    # uvicorn re-raises the signal it caught once it has shut down; a Python handler here turns
    # that into a normal return (exit code 0) instead of death by the default SIGTERM action.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    return run(lambda: _serve(settings, args))


def _uvicorn_config(app, args: argparse.Namespace) -> uvicorn.Config:
    # the event loop is already running (uvloop when installed, see engine.rpc.server.run)
    tls = {}
    if args.tls_cert:
        tls = {"ssl_certfile": args.tls_cert, "ssl_keyfile": args.tls_key}
    if args.tls_client_ca:
        tls.update(ssl_ca_certs=args.tls_client_ca, ssl_cert_reqs=ssl.CERT_REQUIRED)
    return uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False,
                          lifespan="on", timeout_graceful_shutdown=args.shutdown_grace + SHUTDOWN_SLACK_S,
                          server_header=False, **tls)


if __name__ == "__main__":
    sys.exit(main())
