"""The OpenAI-compatible HTTP app: thin routes from JSON bodies to `pdserve.v1.Generation` calls.

    app = create_app(Settings(router="127.0.0.1:50051"))

Every error is an OpenAI error object (gateway/errors.py); status codes never include 422.
Client disconnects cancel the gRPC call, which makes the router abort the request.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from engine.metrics import Metrics
from engine.rpc.security import ClientSecurity
from engine.tool_parsers import ToolCallStream, tool_calls_json
from gateway import protocol as P
from gateway import responses as R
from gateway.errors import APIError, from_grpc
from gateway.router_client import RouterClient
from gateway.sse_guard import MAX_BACKLOG_BYTES, STALL_TIMEOUT_S, GuardedStreamingResponse, SSEGuard
from protos.pdserve.v1 import generation_pb2 as pb

logger = logging.getLogger("pdserve.gateway")

MAX_BODY_BYTES = 8 * 2**20
BODY_TIMEOUT_S = 30.0  # the whole body must arrive within this (a stalled upload holds nothing longer)
MAX_HEADERS = 100
MAX_HEADER_BYTES = 32 * 1024  # all header names and values together
MAX_SSE_BUFFER = 256  # router messages one multi-prompt stream may hold for a client that reads slowly
RETRY_AFTER_S = 1  # sent with 429 and 503
MAX_JSON_DEPTH = 32
_DRAIN_LIMIT = 8 * MAX_BODY_BYTES  # read (and drop) at most this much of an oversized body
OPEN_PATHS = frozenset({"/health"})


@dataclass(frozen=True)
class Settings:
    router: str
    api_keys: tuple[str, ...] = ()
    router_api_key: str | None = None  # default: the first of api_keys
    request_timeout_s: float = 600.0
    max_body_bytes: int = MAX_BODY_BYTES
    max_json_depth: int = MAX_JSON_DEPTH
    version: str = "0.1.0"
    body_timeout_s: float = BODY_TIMEOUT_S
    router_security: ClientSecurity | None = None  # TLS towards the router
    tool_call_parser: str | None = None  # hermes | llama3_json | mistral | pythonic; None: no auto tool choice
    metrics_prefix: str = "pdserve"  # or "vllm": vLLM's metric names
    sse_stall_timeout_s: float = STALL_TIMEOUT_S  # a stream whose reader stays this far behind is aborted
    sse_max_backlog_bytes: int = MAX_BACKLOG_BYTES  # ... "far behind": this many bytes unread (gateway/sse_guard.py)


class ClientGone(Exception):
    """The HTTP client disconnected before the reply was ready."""


# -- auth ----------------------------------------------------------------------------------------

class APIKeyMiddleware:
    """`Authorization: Bearer <key>` on every route but /health (pure ASGI: streams untouched).
    Keys are compared as SHA-256 digests with hmac.compare_digest, all of them, no early exit."""

    def __init__(self, app, keys: tuple[str, ...]):
        self.app = app
        self.digests = [hashlib.sha256(k.encode()).digest() for k in keys]

    def allowed(self, header: bytes | None) -> bool:
        scheme, _, token = (header or b"").decode("latin-1").partition(" ")
        digest = hashlib.sha256(token.strip().encode("utf-8", "surrogateescape")).digest()
        ok = False
        for d in self.digests:
            ok |= hmac.compare_digest(d, digest)
        return ok and scheme.lower() == "bearer"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self.digests or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        header = dict(scope["headers"]).get(b"authorization")
        if self.allowed(header):
            return await self.app(scope, receive, send)
        err = APIError(401, "missing or invalid API key (send 'Authorization: Bearer <key>')",
                       code="invalid_api_key")
        await JSONResponse(err.body(), status_code=401,
                           headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)


# -- request bodies ------------------------------------------------------------------------------

async def read_json(request: Request, settings: Settings) -> dict:
    limit = settings.max_body_bytes
    declared = request.headers.get("content-length")
    too_big = APIError(413, f"request body exceeds the limit of {limit} bytes", code="body_too_large")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        await _drain(request)
        raise too_big
    try:
        async with asyncio.timeout(settings.body_timeout_s):
            chunks = await _read_body(request, limit, too_big)
    except TimeoutError:
        raise APIError(408, f"the request body did not arrive within {settings.body_timeout_s:g} s",
                       code="body_timeout") from None
    except ClientDisconnect:  # gone mid-upload: nobody to answer, nothing to log
        raise ClientGone() from None
    try:
        data = json.loads(b"".join(chunks))
    except RecursionError:
        raise APIError(400, f"JSON nesting exceeds the limit of {settings.max_json_depth} levels",
                       code="json_too_deep") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise APIError(400, f"invalid JSON body: {str(exc)[:200]}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object", code="invalid_json")
    _check_tree(data, 0, settings.max_json_depth)
    return data


async def _read_body(request: Request, limit: int, too_big: APIError) -> list[bytes]:
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            await _drain(request)
            raise too_big
        chunks.append(chunk)
    return chunks


async def _drain(request: Request) -> None:
    """Reads an oversized body to its end (up to a bound) so the client can read our 413."""
    seen = 0
    try:
        async for chunk in request.stream():
            seen += len(chunk)
            if seen > _DRAIN_LIMIT:
                return
    except Exception:  # client gone, stream already consumed
        return


def _check_tree(obj, depth: int, max_depth: int) -> None:
    """JSON nesting depth bound; strings must be encodable (no lone surrogates from \\ud800 escapes)."""
    if depth > max_depth:
        raise APIError(400, f"JSON nesting exceeds the limit of {max_depth} levels", code="json_too_deep")
    if isinstance(obj, str):
        try:
            obj.encode("utf-8")
        except UnicodeEncodeError:
            raise APIError(400, "strings must be valid Unicode (found a lone surrogate)",
                           code="invalid_unicode") from None
    elif isinstance(obj, dict):
        for key, value in obj.items():
            _check_tree(key, depth + 1, max_depth)
            _check_tree(value, depth + 1, max_depth)
    elif isinstance(obj, list):
        for value in obj:
            _check_tree(value, depth + 1, max_depth)


# -- calls ---------------------------------------------------------------------------------------

async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def until_disconnect(request: Request, awaitable):
    """Awaits `awaitable` unless the client disconnects first (then it is cancelled: ClientGone)."""
    task = asyncio.ensure_future(awaitable)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        raise ClientGone()
    try:
        return task.result()
    except grpc.aio.AioRpcError as err:
        raise from_grpc(err) from None


class Gateway:
    """Route handlers; owns the router client and the metrics."""

    def __init__(self, settings: Settings, client: RouterClient, info: pb.ModelInfoResponse,
                 metrics: Metrics):
        self.settings, self.client, self.info, self.metrics = settings, client, info, metrics
        self.started = int(time.time())

    def check_model(self, model: str | None) -> None:
        if model and model != self.info.model:
            raise APIError(404, f"The model `{model[:200]}` does not exist.", param="model",
                           code="model_not_found")

    # -- generation ----------------------------------------------------------------------------

    async def completions(self, request: Request):
        req = P.parse(P.CompletionRequest, await read_json(request, self.settings))
        self.check_model(req.model)
        max_tokens = 16 if req.max_tokens is None else req.max_tokens
        echo = P.echo_plan(req, max_tokens)
        if echo is not None and echo.prompt_only:
            max_tokens = 1  # as vLLM: one token is generated and dropped
        P.check_body(req)
        constraint = P.structured_output(req)
        inputs = P.completion_inputs(req.prompt, self.info.vocab_size)
        grpc_req = P.sampling_proto(req, max_tokens, req.logprobs, inputs, constraint[1] if constraint else None,
                                    prompt_logprobs=P.prompt_logprobs_count(req, echo))
        self.label(request, grpc_req)
        try:
            return await self.generate(request, grpc_req, req, chat=False, num_prompts=len(inputs), echo=echo)
        except APIError as exc:
            raise P.constraint_refusal(exc, constraint[0] if constraint else None) from None

    @staticmethod
    def label(request: Request, grpc_req: pb.GenerateRequest) -> None:
        """X-Request-Id (when the body has no request_id) becomes the client's label of the request."""
        header = request.headers.get("x-request-id")
        if header and not grpc_req.client_request_id:
            grpc_req.client_request_id = header[:256]

    async def chat(self, request: Request):
        req = P.parse(P.ChatCompletionRequest, await read_json(request, self.settings))
        self.check_model(req.model)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs requires logprobs: true", param="top_logprobs")
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        if req.stream and req.prompt_logprobs is not None:
            raise APIError(400, "prompt_logprobs is not supported with stream: true", param="prompt_logprobs",
                           code="unsupported_field")
        P.check_body(req)
        plan = P.tool_plan(req, self.settings.tool_call_parser)
        constraint = P.structured_output(req)
        if constraint and plan.structured is not None:
            raise APIError(400, f"{constraint[0]} cannot be combined with tool_choice {req.tool_choice!r}"[:300],
                           param=constraint[0])
        chat = pb.ChatInput(messages=P.chat_messages(req.messages), tools=plan.tools,
                            add_generation_prompt=req.add_generation_prompt)
        structured = plan.structured or (constraint[1] if constraint else None)
        grpc_req = P.sampling_proto(req, max_tokens, logprobs, [pb.Input(chat=chat)], structured,
                                    prompt_logprobs=req.prompt_logprobs)
        if plan.parser is not None and plan.parser.needs_special_tokens:
            grpc_req.skip_special_tokens = False  # the parser's markers are special tokens
        self.label(request, grpc_req)
        try:
            return await self.generate(request, grpc_req, req, chat=True, num_prompts=1, plan=plan)
        except APIError as exc:  # the router names the engine's parameter; the chat body's may differ
            exc.param = P.renamed_params(req).get(exc.param, exc.param)
            field = constraint[0] if constraint else "tool_choice" if plan.structured is not None else None
            raise P.constraint_refusal(exc, field) from None

    async def legacy_generate(self, request: Request):
        req = P.parse(P.LegacyGenerateRequest, await read_json(request, self.settings))
        self.check_model(req.model)
        if req.stream:
            raise APIError(400, "stream is not supported on /generate; use /v1/completions",
                           param="stream")
        max_tokens = 16 if req.max_tokens is None else req.max_tokens
        P.check_body(req)
        inputs = P.completion_inputs(req.prompt, self.info.vocab_size)
        grpc_req = P.sampling_proto(req, max_tokens, req.logprobs, inputs)
        reply = await self.unary(request, grpc_req)
        return {"text": [c.text for c in reply.completions],
                "usage": R.usage(reply.usage.prompt_tokens, reply.usage.completion_tokens, details=False),
                "model": self.info.model}

    async def generate(self, request: Request, grpc_req: pb.GenerateRequest, req, *, chat: bool,
                       num_prompts: int, plan: P.ToolPlan | None = None, echo: P.Echo | None = None):
        plan = plan or P.ToolPlan()
        if req.stream:
            options = req.stream_options
            usage_mode = ("every" if options and options.continuous_usage_stats else
                          "last" if options and options.include_usage else None)
            prompt_logprobs = None if chat else req.prompt_logprobs
            return await self.stream(request, grpc_req, chat, num_prompts, req.n, usage_mode, plan,
                                     echo=echo, prompt_logprobs=prompt_logprobs)
        reply = await self.unary(request, grpc_req)
        shape = R.Shape(chat, reply.request_id, self.info.model)
        prompts = {c.prompt_index: c for c in reply.completions if c.prompt_token_ids}  # index 0 carries them
        strings = {}
        if grpc_req.HasField("logprobs") or prompts:
            strings = await self.client.token_strings(set().union(
                *(R.token_ids_of(c.logprobs) for c in reply.completions),
                *(R.token_ids_of(c.prompt_logprobs) | set(c.prompt_token_ids) for c in prompts.values())))
        echoed = await self.echo_texts(echo) if echo is not None else None
        choices = []
        for c in reply.completions:
            logprobs = None
            if grpc_req.HasField("logprobs"):
                logprobs = (R.chat_logprobs(c.logprobs, strings) if chat
                            else R.completion_logprobs(c.logprobs, strings, len(echoed[c.prompt_index]) if echo else 0))
            text, finish, calls = c.text, R.FINISH_REASONS[c.finish_reason], None
            if echo is not None:
                text, finish, logprobs = self.echoed(echo, echoed[c.prompt_index], prompts.get(c.prompt_index),
                                                     c, logprobs, strings)
            if plan.parser is not None:
                parsed = plan.parser.parse(c.text, final=True)
                calls = tool_calls_json(parsed) or None
                text = parsed.content or None if calls else c.text
                finish = "tool_calls" if calls and not plan.named and finish == "stop" else finish
            choices.append(shape.choice(c.prompt_index * req.n + c.index, text, finish,
                                        None if echo and echo.prompt_only else R.stop_reason(c),
                                        logprobs, tool_calls=calls))
            if not chat and req.prompt_logprobs is not None:
                choices[-1]["prompt_logprobs"] = R.vllm_prompt_logprobs(
                    prompts[c.prompt_index].prompt_logprobs, strings, req.prompt_logprobs)
        u = reply.usage
        completion_tokens = 0 if echo and echo.prompt_only else u.completion_tokens
        out = shape.full(choices, R.usage(u.prompt_tokens, completion_tokens, u.cached_tokens))
        if chat and req.prompt_logprobs is not None:  # vLLM puts the chat prompt's beside the choices
            out["prompt_logprobs"] = R.vllm_prompt_logprobs(prompts[0].prompt_logprobs, strings, req.prompt_logprobs)
        return out

    async def echo_texts(self, echo: P.Echo) -> list[str]:
        """The text of every prompt (token-id prompts are detokenized, special tokens kept)."""
        async def text(prompt) -> str:
            if isinstance(prompt, str):
                return prompt
            reply = await self.client.detokenize(pb.DetokenizeRequest(token_ids=prompt, skip_special_tokens=False))
            return reply.text
        return list(await asyncio.gather(*(text(p) for p in echo.prompts)))

    @staticmethod
    def echoed(echo: P.Echo, prompt_text: str, prompt: pb.Completion | None, c: pb.Completion,
               logprobs: dict | None, strings: dict[int, str]) -> tuple[str, str | None, dict | None]:
        """(text, finish reason, logprobs) of a completion choice with its prompt echoed in front."""
        finish = "length" if echo.prompt_only else R.FINISH_REASONS[c.finish_reason]
        text = prompt_text if echo.prompt_only else prompt_text + c.text
        if echo.logprobs is not None:
            head = R.echo_logprobs(prompt.prompt_token_ids, prompt.prompt_logprobs, strings, echo.logprobs)
            logprobs = head if echo.prompt_only else R.join_logprobs(head, logprobs)
        return text, finish, logprobs

    async def unary(self, request: Request, grpc_req: pb.GenerateRequest) -> pb.GenerateResponse:
        m, start = self.metrics, time.monotonic()
        m.num_requests_running.inc()
        try:
            reply = await until_disconnect(request, self.client.generate(grpc_req))
        except ClientGone:
            m.aborts.inc()
            raise
        finally:
            m.num_requests_running.dec()
        m.e2e_request_latency_seconds.observe(time.monotonic() - start)
        for c in reply.completions:  # tokens are counted by the nodes, once
            m.request_success(R.METRIC_REASONS.get(c.finish_reason, "error")).inc()
            m.observe_completion(c.prompt_tokens, c.completion_tokens, c.timings)
        m.request_max_num_generation_tokens.observe(max((c.completion_tokens for c in reply.completions), default=0))
        if reply.completions:
            timings = reply.completions[0].timings
            if timings.ttft_ms > 0:
                m.time_to_first_token_seconds.observe(timings.ttft_ms / 1e3)
            if timings.queue_ms > 0:
                m.request_queue_time_seconds.observe(timings.queue_ms / 1e3)
        if any(c.finish_reason == R.FR.FINISH_REASON_ERROR for c in reply.completions):
            raise APIError(500, "generation failed on a node (internal error)", code="generation_error")
        return reply

    async def stream(self, request: Request, grpc_req: pb.GenerateRequest, chat: bool,
                     num_prompts: int, n: int, usage_mode: str | None, plan: P.ToolPlan,
                     echo: P.Echo | None = None, prompt_logprobs: int | None = None):
        """Opens one GenerateStream per prompt and waits for each one's first chunk, so that
        errors the router reports at once still become plain HTTP errors (400, 404, 429, ...)."""
        echoed = await until_disconnect(request, self.echo_texts(echo)) if echo is not None else None
        if num_prompts == 1:
            calls = [self.client.generate_stream(grpc_req)]
        else:
            calls = []
            for item in grpc_req.inputs:
                one = pb.GenerateRequest()
                one.CopyFrom(grpc_req)
                one.ClearField("inputs")
                one.MergeFrom(P.single_input(item))
                calls.append(self.client.generate_stream(one))
        start = time.monotonic()
        self.metrics.num_requests_running.inc()
        try:
            firsts = await until_disconnect(request, asyncio.gather(*(c.read() for c in calls)))
        except BaseException as exc:
            for c in calls:
                c.cancel()
            self.metrics.num_requests_running.dec()
            if isinstance(exc, ClientGone):
                self.metrics.aborts.inc()
            raise
        if any(f is grpc.aio.EOF for f in firsts):
            for c in calls:
                c.cancel()
            self.metrics.num_requests_running.dec()
            raise APIError(500, "the router closed the stream without output (internal error)")
        body = SSEStream(self, calls, firsts, chat, n, usage_mode, start,
                         grpc_req.HasField("logprobs"), plan, echo=echo, echoed=echoed, prompt_logprobs=prompt_logprobs)
        return GuardedStreamingResponse(body.events(), request.app.state.sse, media_type="text/event-stream",
                                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # -- other routes --------------------------------------------------------------------------

    def model_card(self) -> dict:
        return {"id": self.info.model, "object": "model", "created": self.started, "owned_by": "pdserve",
                "root": self.info.model, "parent": None, "max_model_len": self.info.max_model_len}

    async def models(self):
        return {"object": "list", "data": [self.model_card()]}

    async def model(self, model_id: str):
        if model_id != self.info.model:
            raise APIError(404, f"The model `{model_id[:200]}` does not exist.", param="model",
                           code="model_not_found")
        return self.model_card()

    async def tokenize(self, request: Request):
        req = P.parse(P.TokenizeBody, await read_json(request, self.settings))
        self.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "give exactly one of prompt or messages", param="prompt")
        if req.messages is not None:
            grpc_req = pb.TokenizeRequest(messages=P.chat_messages(req.messages),
                                          add_special_tokens=req.add_special_tokens)
        else:
            grpc_req = pb.TokenizeRequest(text=req.prompt, add_special_tokens=req.add_special_tokens)
        reply = await until_disconnect(request, self.client.tokenize(grpc_req))
        return {"count": len(reply.token_ids), "max_model_len": reply.max_model_len or self.info.max_model_len,
                "tokens": list(reply.token_ids), "token_strs": list(reply.tokens) or None}

    async def detokenize(self, request: Request):
        req = P.parse(P.DetokenizeBody, await read_json(request, self.settings))
        self.check_model(req.model)
        P.check_token_ids("tokens", req.tokens, self.info.vocab_size)
        reply = await until_disconnect(request, self.client.detokenize(pb.DetokenizeRequest(token_ids=req.tokens)))
        return {"prompt": reply.text}

    async def health(self):
        if await self.client.healthy():
            return Response(status_code=200)
        return JSONResponse(APIError(503, "router is not serving").body(), status_code=503)

    async def metrics_text(self):
        body, content_type = self.metrics.exposition()
        return Response(body, media_type=content_type)


async def _rest(call):
    """The remaining messages of a stream whose first one was taken with read() (the read API and
    the iterator API may not be mixed on one call)."""
    while (msg := await call.read()) is not grpc.aio.EOF:
        yield msg


class SSEStream:
    """The body of one streamed response: chunks of every prompt's stream, in arrival order."""

    def __init__(self, gw: Gateway, calls, firsts, chat: bool, n: int, usage_mode: str | None,
                 start: float, logprobs: bool, plan: P.ToolPlan, echo: P.Echo | None = None,
                 echoed: list[str] | None = None, prompt_logprobs: int | None = None):
        self.gw, self.calls, self.firsts = gw, calls, firsts
        # completions: `echo` puts each prompt's text (`echoed`) and, with logprobs, its tokens'
        # logprobs before the first chunk of each choice; vLLM's `prompt_logprobs` rides on that
        # chunk too. Both read the prompt's logprobs from its stream's first chunk of index 0
        # (n = 1 when they are needed: protocol.echo_plan).
        self.echo, self.echoed, self.prompt_logprobs = echo, echoed, prompt_logprobs
        self.prompt_data: dict[int, tuple[list[int], list]] = {}  # prompt index -> (token ids, prompt logprobs)
        self.chat, self.n, self.start = chat, n, start
        self.include_usage, self.usage_every_chunk = usage_mode is not None, usage_mode == "every"
        self.logprobs, self.plan = logprobs, plan
        self.tool_streams: dict[int, ToolCallStream] = {}
        self.shape = R.Shape(chat, firsts[0].request_id, gw.info.model)
        self.prompt_tokens = [0] * len(calls)
        self.cached_tokens = [0] * len(calls)
        self.completion_tokens: dict[int, int] = {}
        self.last_token_at: dict[int, float] = {}
        self.first_token_at: dict[int, float] = {}
        self.text_offset: dict[int, int] = {}

    async def _merged(self):
        if len(self.calls) == 1:
            yield 0, self.firsts[0]
            async for msg in _rest(self.calls[0]):
                yield 0, msg
            return
        queue: asyncio.Queue = asyncio.Queue(MAX_SSE_BUFFER)  # full: the pumps stop reading, gRPC flow
        # control holds the router back, and the router aborts a stream that falls too far behind

        async def pump(i: int, call, first):
            try:
                await queue.put((i, first))
                async for msg in _rest(call):
                    await queue.put((i, msg))
                await queue.put((i, None))
            except asyncio.CancelledError:  # the stream is over: never wait on a full queue again
                raise
            except BaseException as exc:  # the error travels to the consumer
                await queue.put((i, exc))

        tasks = [asyncio.ensure_future(pump(i, c, f)) for i, (c, f) in enumerate(zip(self.calls, self.firsts))]
        try:
            open_streams = len(tasks)
            while open_streams:
                i, item = await queue.get()
                if item is None:
                    open_streams -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield i, item
        finally:
            for t in tasks:
                t.cancel()

    async def events(self):
        m = self.gw.metrics
        shape, finished = self.shape, False
        try:
            if self.chat:
                for index in range(self.n * len(self.calls)):
                    yield R.sse(shape.chunk(index, None, None, None, None, role=True,
                                            with_usage=self.include_usage))
            async for prompt_index, msg in self._merged():
                yield R.sse(await self._chunk(prompt_index, msg))
            finished = True
            if self.include_usage:
                yield R.sse(shape.usage_chunk(self._usage()))
        except grpc.aio.AioRpcError as err:
            finished = True
            yield R.sse(from_grpc(err).body())
        except (asyncio.CancelledError, GeneratorExit):  # client gone: calls cancelled below
            m.aborts.inc()
            raise
        except Exception as exc:  # a bug of ours: still a well-formed end of stream
            logger.error("stream failed", exc_info=exc)
            yield R.sse(APIError(500, "internal error").body())
        finally:
            for c in self.calls:
                c.cancel()
            m.num_requests_running.dec()
            if finished:  # tokens are counted by the nodes, once
                m.e2e_request_latency_seconds.observe(time.monotonic() - self.start)
                m.request_max_num_generation_tokens.observe(max(self.completion_tokens.values(), default=0))
        yield R.SSE_DONE

    async def _chunk(self, prompt_index: int, msg: pb.GenerateStreamResponse) -> dict:
        m, now = self.gw.metrics, time.monotonic()
        index = prompt_index * self.n + msg.index
        self.prompt_tokens[prompt_index] = msg.prompt_tokens
        self.cached_tokens[prompt_index] = msg.cached_tokens
        self.completion_tokens[index] = msg.completion_tokens
        if msg.token_ids:
            last = self.last_token_at.get(index)
            if last is None:
                if index == 0:
                    m.time_to_first_token_seconds.observe(now - self.start)
            else:
                m.inter_token_latency_seconds.observe(now - last)
                m.time_per_output_token_seconds.observe(now - last)
            self.first_token_at.setdefault(index, now)
            self.last_token_at[index] = now
        finish = R.FINISH_REASONS[msg.finish_reason]
        if finish is not None:
            m.request_success(R.METRIC_REASONS[msg.finish_reason]).inc()
            first = self.first_token_at.get(index)
            m.observe_completion(msg.prompt_tokens, msg.completion_tokens, msg.timings,
                                 None if first is None else now - first)
            if msg.timings.queue_ms > 0 and msg.index == 0:
                m.request_queue_time_seconds.observe(msg.timings.queue_ms / 1e3)
        if finish == "error":
            raise grpc.aio.AioRpcError(grpc.StatusCode.INTERNAL, None, None,
                                       details="internal error: generation failed on a node")
        if msg.prompt_token_ids:
            self.prompt_data[prompt_index] = (list(msg.prompt_token_ids), list(msg.prompt_logprobs))
        first = index not in self.text_offset  # every chunk of a choice sets its text offset
        echo = self.echo
        prompt_only = echo is not None and echo.prompt_only
        if prompt_only:  # max_tokens 0: the one generated token is dropped
            self.completion_tokens[index] = 0
            finish = "length" if finish is not None else None
        if echo is not None and first:
            self.text_offset[index] = len(self.echoed[prompt_index])
        logprobs = None
        if self.logprobs and not prompt_only:
            strings = await self.gw.client.token_strings(R.token_ids_of(msg.logprobs))
            if self.chat:
                logprobs = R.chat_logprobs(msg.logprobs, strings)
            else:
                offset = self.text_offset.get(index, 0)
                logprobs = R.completion_logprobs(msg.logprobs, strings, offset)
        text, calls = ("" if prompt_only else msg.text), None
        self.text_offset[index] = self.text_offset.get(index, 0) + len(text)
        if self.plan.parser is not None:
            text, calls, finish = self._tool_delta(index, msg.text, finish)
        extra = {}
        if first and (echo is not None or self.prompt_logprobs is not None):
            text, logprobs, extra = await self._prompt_part(prompt_index, text, logprobs)
        out = self.shape.chunk(index, text, finish, None if prompt_only else R.stop_reason(msg), logprobs,
                               with_usage=self.include_usage, tool_calls=calls)
        out["choices"][0].update(extra)
        if self.usage_every_chunk:
            out["usage"] = self._usage()
        return out

    async def _prompt_part(self, prompt_index: int, text: str, logprobs: dict | None):
        """A choice's first chunk with the prompt put in front (echo) and vLLM's prompt_logprobs."""
        echo, extra = self.echo, {}
        needs_logprobs = self.prompt_logprobs is not None or (echo is not None and echo.logprobs is not None)
        ids, entries = self.prompt_data.get(prompt_index, ([], []))
        if needs_logprobs and not ids:
            raise grpc.aio.AioRpcError(grpc.StatusCode.INTERNAL, None, None,
                                       details="internal error: the stream carried no prompt logprobs")
        strings = {}
        if needs_logprobs:
            strings = await self.gw.client.token_strings(set(ids) | R.token_ids_of(entries))
        if echo is not None:
            text = self.echoed[prompt_index] + text
            if echo.logprobs is not None:
                head = R.echo_logprobs(ids, entries, strings, echo.logprobs)
                logprobs = head if logprobs is None else R.join_logprobs(head, logprobs)
        if self.prompt_logprobs is not None:
            extra["prompt_logprobs"] = R.vllm_prompt_logprobs(entries, strings, self.prompt_logprobs)
        return text, logprobs, extra

    def _tool_delta(self, index: int, text: str, finish: str | None):
        """(content delta, tool_call deltas, finish reason) of one chunk through the tool parser."""
        stream = self.tool_streams.setdefault(index, ToolCallStream(self.plan.parser))
        content, calls = stream.feed(text)
        if finish is not None:
            more, last = stream.finish()
            content, calls = content + more, calls + last
            if stream.num_calls and not self.plan.named and finish == "stop":
                finish = "tool_calls"
        return content, calls or None, finish

    def _usage(self) -> dict:
        return R.usage(sum(self.prompt_tokens), sum(self.completion_tokens.values()),
                       sum(self.cached_tokens))


# -- app -----------------------------------------------------------------------------------------

async def connect(settings: Settings, wait_s: float = 60.0) -> tuple[RouterClient, pb.ModelInfoResponse]:
    """A client whose router answered ModelInfo (retried until `wait_s` runs out)."""
    router_key = settings.router_api_key or (settings.api_keys[0] if settings.api_keys else None)
    client = RouterClient(settings.router, api_key=router_key, timeout_s=settings.request_timeout_s,
                          security=settings.router_security)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return client, await client.model_info()
        except grpc.aio.AioRpcError as err:
            if time.monotonic() > deadline or err.code() not in (
                    grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                await client.close()
                raise RuntimeError(f"router {settings.router} did not answer ModelInfo: "
                                   f"{err.code().name} {err.details()}") from None
            await asyncio.sleep(0.2)


def create_app(settings: Settings, router_wait_s: float = 60.0,
               connected: tuple[RouterClient, pb.ModelInfoResponse] | None = None) -> FastAPI:
    """The app; it connects to the router at startup unless `connected` (from `connect()`) is given."""
    holder: dict[str, Gateway] = {}

    @asynccontextmanager
    async def lifespan(_app):
        client, info = connected or await connect(settings, router_wait_s)
        holder["gw"] = Gateway(settings, client, info, Metrics(info.model, "gateway", prefix=settings.metrics_prefix,
                                                                max_model_len=info.max_model_len))
        try:
            yield
        finally:
            await client.close()

    app = FastAPI(title="pdserve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.sse = SSEGuard(settings.sse_stall_timeout_s, settings.sse_max_backlog_bytes)  # open SSE streams

    def gw() -> Gateway:
        return holder["gw"]

    @app.exception_handler(APIError)
    async def _api_error(_req, exc: APIError):
        headers = {"Retry-After": str(RETRY_AFTER_S)} if exc.status in (429, 503) else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(ClientGone)
    async def _gone(_req, _exc):
        return JSONResponse(APIError(499, "client disconnected").body(), status_code=499)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_req, exc: RequestValidationError):
        return JSONResponse(APIError(400, str(exc.errors()[:1])).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_req, exc: StarletteHTTPException):
        return JSONResponse(APIError(exc.status_code, str(exc.detail)).body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _internal(_req, exc: Exception):
        logger.error("unhandled error", exc_info=exc)
        return JSONResponse(APIError(500, "internal error").body(), status_code=500)

    async def completions(request: Request):
        return await gw().completions(request)

    async def chat(request: Request):
        return await gw().chat(request)

    async def generate(request: Request):
        return await gw().legacy_generate(request)

    async def tokenize(request: Request):
        return await gw().tokenize(request)

    async def detokenize(request: Request):
        return await gw().detokenize(request)

    async def models():
        return await gw().models()

    async def model(model_id: str):
        return await gw().model(model_id)

    async def health():
        return await gw().health()

    async def metrics():
        return await gw().metrics_text()

    async def version():
        return {"version": settings.version}

    for path, endpoint, method in (
            ("/v1/completions", completions, "POST"), ("/v1/chat/completions", chat, "POST"),
            ("/generate", generate, "POST"), ("/tokenize", tokenize, "POST"),
            ("/detokenize", detokenize, "POST"), ("/v1/models", models, "GET"),
            ("/v1/models/{model_id:path}", model, "GET"),
            ("/health", health, "GET"), ("/metrics", metrics, "GET"), ("/version", version, "GET")):
        app.add_api_route(path, endpoint, methods=[method])
    app.add_middleware(APIKeyMiddleware, keys=settings.api_keys)
    app.add_middleware(RequestIdMiddleware)
    app.add_middleware(HeaderLimitMiddleware)
    return app


class HeaderLimitMiddleware:
    """At most MAX_HEADERS headers of MAX_HEADER_BYTES in all, else 431 (pure ASGI, before any route)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = scope["headers"]
            size = sum(len(k) + len(v) for k, v in headers)
            if len(headers) > MAX_HEADERS or size > MAX_HEADER_BYTES:
                err = APIError(431, f"request headers exceed the limits ({MAX_HEADERS} headers, "
                                    f"{MAX_HEADER_BYTES} bytes in all)", code="headers_too_large")
                return await JSONResponse(err.body(), status_code=431)(scope, receive, send)
        return await self.app(scope, receive, send)


class RequestIdMiddleware:
    """Echoes the client's X-Request-Id on the response (pure ASGI: streams untouched)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        header = dict(scope["headers"]).get(b"x-request-id") if scope["type"] == "http" else None
        if not header:
            return await self.app(scope, receive, send)

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), (b"x-request-id", header[:256])]}
            await send(message)

        return await self.app(scope, receive, send_with_id)
