"""gRPC reflection answers under v1 and v1alpha, and health List is answered (a real grpc.aio server
from engine.rpc.server.build_server on loopback)."""
from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2

from engine.rpc.reflection import V1_SERVICE_NAME
from engine.rpc.server import build_server, run
from protos.pdserve.v1 import generation_pb2_grpc


async def _reflect(channel, service: str, request: reflection_pb2.ServerReflectionRequest):
    call = channel.stream_stream(f"/{service}/ServerReflectionInfo",
                                 request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                                 response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
    return [r async for r in call(iter([request]), timeout=10)]


def test_reflection_v1_and_v1alpha_and_health_list():
    async def main():
        server = build_server([(generation_pb2_grpc.add_GenerationServicer_to_server,
                                generation_pb2_grpc.GenerationServicer())])
        await server.start()
        await server.set_serving(True)
        try:
            async with grpc.aio.insecure_channel(server.address) as channel:
                listed = {}
                for service in (V1_SERVICE_NAME, "grpc.reflection.v1alpha.ServerReflection"):
                    (reply,) = await _reflect(channel, service, reflection_pb2.ServerReflectionRequest(list_services=""))
                    listed[service] = {s.name for s in reply.list_services_response.service}
                    (reply,) = await _reflect(channel, service, reflection_pb2.ServerReflectionRequest(
                        file_containing_symbol="pdserve.v1.Generation"))
                    assert reply.file_descriptor_response.file_descriptor_proto
                health = health_pb2_grpc.HealthStub(channel)
                statuses = (await health.List(health_pb2.HealthListRequest(), timeout=5)).statuses
        finally:
            await server.stop(0)
        return listed, statuses

    listed, statuses = run(main)
    for names in listed.values():
        assert {"pdserve.v1.Generation", "grpc.health.v1.Health", V1_SERVICE_NAME,
                "grpc.reflection.v1alpha.ServerReflection"} <= names
    assert statuses[""].status == health_pb2.HealthCheckResponse.SERVING
    assert statuses["pdserve.v1.Generation"].status == health_pb2.HealthCheckResponse.SERVING
