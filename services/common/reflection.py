"""Server reflection in both packages clients use: ``grpc.reflection.v1alpha`` and ``grpc.reflection.v1``.

grpcio-reflection implements only ``v1alpha`` (older grpcurl). Newer grpcurl, grpcui and Postman ask
``grpc.reflection.v1`` first. The two are the same protocol: the same messages, field for field, under
another package name. So ``v1`` is served by grpcio-reflection's own servicer: its descriptors are
``v1alpha``'s with the package renamed (added to the default pool, so reflection can describe it too),
and each message crosses between the two by its wire bytes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from grpc_reflection.v1alpha import reflection
from grpc_reflection.v1alpha import reflection_pb2 as alpha

V1_PACKAGE = "grpc.reflection.v1"
V1_SERVICE_NAME = f"{V1_PACKAGE}.ServerReflection"
_V1_FILE = "grpc/reflection/v1/reflection.proto"
_ALPHA_PREFIX = f".{alpha.DESCRIPTOR.package}."


def _v1_file() -> Any:
    """The ``grpc.reflection.v1`` file descriptor, built from ``v1alpha``'s, in the default pool."""
    pool = descriptor_pool.Default()
    try:
        return pool.FindFileByName(_V1_FILE)
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    alpha.DESCRIPTOR.CopyToProto(proto)
    proto.name, proto.package = _V1_FILE, V1_PACKAGE
    proto.ClearField("options")
    for message in proto.message_type:
        for field in message.field:
            if field.type_name.startswith(_ALPHA_PREFIX):
                field.type_name = f".{V1_PACKAGE}." + field.type_name.removeprefix(_ALPHA_PREFIX)
    for service in proto.service:
        for method in service.method:
            method.input_type = f".{V1_PACKAGE}." + method.input_type.removeprefix(_ALPHA_PREFIX)
            method.output_type = f".{V1_PACKAGE}." + method.output_type.removeprefix(_ALPHA_PREFIX)
    pool.Add(proto)
    return pool.FindFileByName(_V1_FILE)


def v1_message(name: str) -> Any:
    """The ``grpc.reflection.v1`` message class ``name`` (e.g. ``ServerReflectionRequest``)."""
    return message_factory.GetMessageClass(_v1_file().message_types_by_name[name])


def enable(service_names: Sequence[str], server: grpc.aio.Server) -> None:
    """Serve reflection over ``service_names`` (both reflection services are added to them)."""
    names = [*service_names, reflection.SERVICE_NAME, V1_SERVICE_NAME]
    reflection.enable_server_reflection(names, server)
    alpha_servicer = reflection.aio.ReflectionServicer(names)
    request_class = v1_message("ServerReflectionRequest")
    response_class = v1_message("ServerReflectionResponse")

    async def info(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async def as_alpha() -> AsyncIterator[alpha.ServerReflectionRequest]:
            async for request in requests:
                yield alpha.ServerReflectionRequest.FromString(request.SerializeToString())

        async for response in alpha_servicer.ServerReflectionInfo(as_alpha(), context):
            yield response_class.FromString(response.SerializeToString())

    handler = grpc.method_handlers_generic_handler(
        V1_SERVICE_NAME,
        {
            "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
                info,
                request_deserializer=request_class.FromString,
                response_serializer=response_class.SerializeToString,
            )
        },
    )
    server.add_generic_rpc_handlers((handler,))
