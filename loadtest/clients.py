"""Streaming clients: pdserve's gRPC `GenerateStream` and OpenAI-compatible HTTP (SSE).

Each `send(spec, record)` streams one request and fills its `Record`: when it started, when each
chunk of tokens arrived (seconds on the run's clock), token counts, the status (``ok``, a gRPC
status name or an HTTP status code) and, from pdserve, the server's own timings.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from loadtest.workload import Prompt, RequestSpec

CHUNK_TIMEOUT_S = 600.0  # default per-request budget (the server's deadline too)
INFO_TIMEOUT_S = 10.0


@dataclass
class Record:
    index: int
    kind: str
    prompt_tokens: int
    max_tokens: int
    scheduled: float | None = None           # when the arrival process wanted it sent (s); None = closed loop
    start: float | None = None               # s on the run clock
    end: float | None = None
    chunk_times: list[float] = field(default_factory=list)  # arrival of each chunk holding tokens
    output_tokens: int = 0
    status: str = "pending"                  # ok | a gRPC code name | an HTTP status | cancelled | error
    error: str = ""
    finish_reason: str = ""
    server: dict = field(default_factory=dict)  # pdserve's RequestTimings (ms, bytes, node ids)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass(frozen=True)
class TargetConfig:
    backend: str                       # grpc | completions | chat
    address: str                       # host:port (grpc) or base URL (http)
    model: str = ""                    # "" = the served model (asked once over HTTP)
    api_key: str | None = None
    tls: bool = False                  # grpc: TLS with the system roots (or tls_ca)
    tls_ca: str | None = None          # PEM file of the CA that signed the server's certificate
    tls_server_name: str | None = None  # grpc: the name to check the certificate against
    insecure_skip_verify: bool = False  # https only: do not verify the certificate
    temperature: float = 0.0
    ignore_eos: bool = True            # so every request produces its max_tokens
    timeout_s: float = CHUNK_TIMEOUT_S

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.backend == "grpc" and self.insecure_skip_verify:
            raise ValueError("gRPC cannot skip certificate checks: pass --tls-ca (and --tls-server-name)")


class Clock:
    """Seconds since the run started (perf_counter based)."""

    def __init__(self):
        self.t0 = time.perf_counter()

    def restart(self) -> None:
        self.t0 = time.perf_counter()

    def now(self) -> float:
        return time.perf_counter() - self.t0


# -- gRPC ------------------------------------------------------------------------------------------

class GrpcClient:
    def __init__(self, target: TargetConfig, clock: Clock):
        import grpc

        from engine.rpc.channel import aio_channel
        from protos.pdserve.v1 import generation_pb2, generation_pb2_grpc

        self.pb, self.grpc, self.target, self.clock = generation_pb2, grpc, target, clock
        self.channel = aio_channel(target.address, self._credentials(target), options=self._options(target))
        self.stub = generation_pb2_grpc.GenerationStub(self.channel)
        self.metadata = (("authorization", f"Bearer {target.api_key}"),) if target.api_key else ()

    def _credentials(self, target: TargetConfig):
        if not (target.tls or target.tls_ca):
            return None
        root = open(target.tls_ca, "rb").read() if target.tls_ca else None
        return self.grpc.ssl_channel_credentials(root_certificates=root)

    @staticmethod
    def _options(target: TargetConfig):
        return (("grpc.ssl_target_name_override", target.tls_server_name),) if target.tls_server_name else ()

    def request(self, spec: RequestSpec):
        pb, p = self.pb, spec.prompt
        kwargs = {}
        if p.ids is not None:
            kwargs["token_ids"] = pb.TokenIds(ids=p.ids)
        elif p.system is not None:
            kwargs["chat"] = pb.ChatInput(messages=[pb.ChatMessage(role="system", content=p.system),
                                                    pb.ChatMessage(role="user", content=p.text)])
        else:
            kwargs["text"] = p.text
        return pb.GenerateRequest(model=self.target.model, sampling=pb.SamplingParameters(
            temperature=self.target.temperature), stopping=pb.StoppingCriteria(
            max_new_tokens=spec.max_tokens, ignore_eos=self.target.ignore_eos), **kwargs)

    async def server_info(self) -> dict:
        model = await self.stub.ModelInfo(self.pb.ModelInfoRequest(), timeout=INFO_TIMEOUT_S, metadata=self.metadata)
        info = await self.stub.ServerInfo(self.pb.ServerInfoRequest(), timeout=INFO_TIMEOUT_S, metadata=self.metadata)
        return {"model": model.model, "max_model_len": model.max_model_len, "vocab_size": model.vocab_size,
                "block_size": model.block_size, "roles": list(model.roles), "dtype": model.dtype,
                "version": info.version, "nodes": len(info.nodes)}

    async def send(self, spec: RequestSpec, record: Record) -> None:
        record.start = self.clock.now()
        try:
            call = self.stub.GenerateStream(self.request(spec), timeout=self.target.timeout_s, metadata=self.metadata)
            async for msg in call:
                if msg.token_ids:
                    record.chunk_times.append(self.clock.now())
                record.output_tokens = msg.completion_tokens
                record.prompt_tokens = msg.prompt_tokens or record.prompt_tokens
                if msg.finish_reason:
                    record.finish_reason = self.pb.FinishReason.Name(msg.finish_reason)
                    record.server = _timings(msg.timings)
            record.status = FINISH_STATUS.get(record.finish_reason, "ok")
            record.error = "" if record.ok else f"stream ended: {record.finish_reason or 'no final message'}"
        except self.grpc.aio.AioRpcError as err:
            record.status, record.error = err.code().name, err.details() or ""
        finally:
            record.end = self.clock.now()

    async def close(self) -> None:
        await self.channel.close(grace=None)


FINISH_STATUS = {"": "no_final_message", "FINISH_REASON_ERROR": "error", "FINISH_REASON_ABORTED": "aborted",
                 "FINISH_REASON_TIME_LIMIT": "time_limit"}


def _timings(t) -> dict:
    return {"queue_ms": t.queue_ms, "ttft_ms": t.ttft_ms, "e2e_ms": t.e2e_ms, "prefill_ms": t.prefill_ms,
            "kv_transfer_ms": t.kv_transfer_ms, "kv_transfer_bytes": t.kv_transfer_bytes,
            "prefill_node": t.prefill_node, "decode_node": t.decode_node}


# -- OpenAI-compatible HTTP ------------------------------------------------------------------------

class OpenAIClient:
    """/v1/completions or /v1/chat/completions with stream=true and stream_options.include_usage."""

    def __init__(self, target: TargetConfig, clock: Clock, max_connections: int):
        import httpx

        self.httpx, self.target, self.clock = httpx, target, clock
        verify = False if target.insecure_skip_verify else (target.tls_ca or True)
        headers = {"Authorization": f"Bearer {target.api_key}"} if target.api_key else {}
        self.http = httpx.AsyncClient(base_url=target.address.rstrip("/"), headers=headers, verify=verify,
                                      timeout=httpx.Timeout(target.timeout_s, connect=30.0),
                                      limits=httpx.Limits(max_connections=max_connections,
                                                          max_keepalive_connections=max_connections))
        self.path = "/v1/chat/completions" if target.backend == "chat" else "/v1/completions"
        self.model = target.model

    async def server_info(self) -> dict:
        reply = await self.http.get("/v1/models", timeout=INFO_TIMEOUT_S)
        reply.raise_for_status()
        model = reply.json()["data"][0]
        self.model = self.model or model["id"]
        info = {"model": self.model, "max_model_len": model.get("max_model_len")}
        version = await self.http.get("/version", timeout=INFO_TIMEOUT_S)
        if version.status_code == 200:
            info["version"] = version.json().get("version")
        return info

    def body(self, spec: RequestSpec) -> dict:
        body = {"model": self.model, "max_tokens": spec.max_tokens, "temperature": self.target.temperature,
                "stream": True, "stream_options": {"include_usage": True}}
        if self.target.ignore_eos:
            body["ignore_eos"] = True
        body.update(_chat_body(spec.prompt) if self.target.backend == "chat" else _completion_body(spec.prompt))
        return body

    async def send(self, spec: RequestSpec, record: Record) -> None:
        record.start = self.clock.now()
        try:
            async with self.http.stream("POST", self.path, json=self.body(spec)) as reply:
                if reply.status_code != 200:
                    record.status = str(reply.status_code)
                    record.error = _error_message((await reply.aread()).decode("utf-8", "replace"))
                    return
                await self._read(reply, record)
        except self.httpx.TimeoutException as exc:
            record.status, record.error = "timeout", str(exc) or type(exc).__name__
        except self.httpx.TransportError as exc:
            record.status, record.error = "connection", str(exc) or type(exc).__name__
        finally:
            record.end = self.clock.now()

    async def _read(self, reply, record: Record) -> None:
        events = 0
        async for line in reply.aiter_lines():
            if not line.startswith("data:"):
                continue
            payload = line[5:].strip()
            if payload == "[DONE]":
                break
            chunk = json.loads(payload)
            if "error" in chunk:
                record.status, record.error = "stream_error", _error_message(payload)
                return
            if chunk.get("usage"):
                record.prompt_tokens = chunk["usage"].get("prompt_tokens", record.prompt_tokens)
                record.output_tokens = chunk["usage"].get("completion_tokens", events)
            for choice in chunk.get("choices") or ():
                if _is_token(choice):
                    events += 1
                    record.chunk_times.append(self.clock.now())
                record.finish_reason = choice.get("finish_reason") or record.finish_reason
        record.output_tokens = record.output_tokens or events
        record.status = "ok"

    async def close(self) -> None:
        await self.http.aclose()


def _is_token(choice: dict) -> bool:
    """A chunk that carries generated text (not chat's role-only opener, not an empty closing chunk)."""
    delta = choice.get("delta")
    if delta is not None and "role" in delta and not delta.get("content"):
        return False
    text = delta.get("content") if delta is not None else choice.get("text")
    return bool(text) or (text is not None and choice.get("finish_reason") is None)


def _completion_body(p: Prompt) -> dict:
    if p.ids is not None:
        return {"prompt": list(p.ids)}
    return {"prompt": p.text if p.system is None else f"{p.system}\n\n{p.text}"}


def _chat_body(p: Prompt) -> dict:
    if p.ids is not None:
        raise ValueError("chat endpoints take text: use --prompt-format text")
    messages = [{"role": "system", "content": p.system}] if p.system is not None else []
    return {"messages": messages + [{"role": "user", "content": p.text}]}


def _error_message(body: str) -> str:
    try:
        error = json.loads(body).get("error")
    except (ValueError, AttributeError):
        return body[:300]
    return (error.get("message") if isinstance(error, dict) else str(error))[:300]


BACKENDS = ("grpc", "completions", "chat")


def make_client(target: TargetConfig, clock: Clock, max_connections: int):
    if target.backend == "grpc":
        return GrpcClient(target, clock)
    return OpenAIClient(target, clock, max_connections)

