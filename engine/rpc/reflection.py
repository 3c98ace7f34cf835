"""gRPC server reflection under both names clients use (`grpc.reflection.v1`, what grpcurl and
Postman try first, and `grpc.reflection.v1alpha`), and a health servicer that answers `List`.

grpcio-reflection only registers v1alpha; the v1 protocol is the same messages under another
package, so one servicer answers both (its request and response bytes are identical)."""
from __future__ import annotations

import grpc
from grpc_health.v1 import health, health_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

V1_SERVICE_NAME = "grpc.reflection.v1.ServerReflection"
HEALTH_SERVICE_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


def enable_reflection(server: grpc.aio.Server, service_names) -> None:
    names = (*service_names, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME, V1_SERVICE_NAME)
    servicer = reflection.aio.ReflectionServicer(names)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    v1 = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo, request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(V1_SERVICE_NAME, {"ServerReflectionInfo": v1}),))


class HealthServicer(health.aio.HealthServicer):
    """grpc.health.v1.Health with `List` answered (every service with a status, "" = the server)."""

    async def List(self, request, context) -> health_pb2.HealthListResponse:
        return health_pb2.HealthListResponse(statuses={
            name: health_pb2.HealthCheckResponse(status=status) for name, status in self._server_status.items()})
