"""The gateway's only way to the model: `pdserve.v1.Generation` on the router, over grpc.aio."""
from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from engine.metrics import COUNTED_BY_KEY
from engine.rpc.channel import aio_channel
from engine.rpc.security import ClientSecurity
from protos.pdserve.v1 import generation_pb2 as pb
from protos.pdserve.v1 import generation_pb2_grpc

INFO_TIMEOUT_S = 10.0
HEALTH_TIMEOUT_S = 2.0
_TOKEN_CACHE_SIZE = 65536


class RouterClient:
    def __init__(self, address: str, api_key: str | None = None, timeout_s: float = 600.0,
                 security: ClientSecurity | None = None):
        self.address, self.timeout_s = address, timeout_s
        self.channel = aio_channel(address, security=security)  # TLS when security.tls_ca is set
        self.stub = generation_pb2_grpc.GenerationStub(self.channel)
        self._health = health_pb2_grpc.HealthStub(self.channel)
        self.metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self.generate_metadata = (*self.metadata, (COUNTED_BY_KEY, "gateway"))  # we count these requests
        self._info: pb.ModelInfoResponse | None = None
        self._tokens: dict[int, str] = {}

    async def close(self) -> None:
        await self.channel.close(grace=None)

    # -- calls ------------------------------------------------------------------------------------

    async def generate(self, request: pb.GenerateRequest) -> pb.GenerateResponse:
        return await self.stub.Generate(request, timeout=self.timeout_s, metadata=self.generate_metadata)

    def generate_stream(self, request: pb.GenerateRequest):
        return self.stub.GenerateStream(request, timeout=self.timeout_s, metadata=self.generate_metadata)

    async def tokenize(self, request: pb.TokenizeRequest) -> pb.TokenizeResponse:
        return await self.stub.Tokenize(request, timeout=INFO_TIMEOUT_S, metadata=self.metadata)

    async def detokenize(self, request: pb.DetokenizeRequest) -> pb.DetokenizeResponse:
        return await self.stub.Detokenize(request, timeout=INFO_TIMEOUT_S, metadata=self.metadata)

    async def model_info(self) -> pb.ModelInfoResponse:
        """The served model (fetched once, then cached: it never changes under a router)."""
        if self._info is None:
            self._info = await self.stub.ModelInfo(pb.ModelInfoRequest(), timeout=INFO_TIMEOUT_S,
                                                   metadata=self.metadata)
        return self._info

    async def healthy(self) -> bool:
        try:
            reply = await self._health.Check(health_pb2.HealthCheckRequest(service=""),
                                             timeout=HEALTH_TIMEOUT_S)
        except grpc.aio.AioRpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    async def token_strings(self, ids) -> dict[int, str]:
        """Token id -> its text alone (special tokens kept), for logprobs; cached."""
        missing = sorted({i for i in ids if i not in self._tokens})

        async def one(i: int) -> str:
            reply = await self.detokenize(pb.DetokenizeRequest(token_ids=[i], skip_special_tokens=False))
            return reply.text

        if missing:
            texts = await asyncio.gather(*(one(i) for i in missing))
            if len(self._tokens) + len(missing) > _TOKEN_CACHE_SIZE:
                self._tokens.clear()
            self._tokens.update(zip(missing, texts))
        return {i: self._tokens[i] for i in ids}
