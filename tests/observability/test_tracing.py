"""One request, one trace: gateway, auth, inference and the worker, as real processes exporting over OTLP."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections import Counter, defaultdict

import grpc
import numpy as np
import pytest
from auth.v1 import auth_pb2, auth_pb2_grpc
from inference import grpc_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from services.inference import codec
from tests.polling import eventually
from tests.processes import ServiceProcess, start_service

MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
VALIDATE_TOKEN = "/auth.v1.AuthService/ValidateToken"


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """A local OTLP trace receiver: span names by trace ID and service."""

    def __init__(self) -> None:
        self.spans: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))

    async def Export(self, request, context):
        for resource_spans in request.resource_spans:
            service = next(
                (a.value.string_value for a in resource_spans.resource.attributes if a.key == "service.name"), "?"
            )
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    self.spans[span.trace_id.hex()][service].append(span.name)
        return trace_service_pb2.ExportTraceServiceResponse()


@pytest.fixture
async def collector():
    receiver = Collector()
    server = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield receiver, port
    await server.stop(0.5)


async def test_one_request_is_one_trace_across_four_processes(collector, demo_models, tmp_path):
    receiver, port = collector
    otel = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    (tmp_path / "models").mkdir()
    shutil.copytree(demo_models / "iris", tmp_path / "models" / "iris")
    started: list[ServiceProcess] = []
    try:
        for name in ("auth", "inference"):
            # At DEBUG the worker logs each inference (worker.inference), so its lines can be checked too.
            env = {**otel, "INFERENCE_LOG_LEVEL": "DEBUG"} if name == "inference" else otel
            started.append(await asyncio.to_thread(start_service, name, tmp_path, env))
        auth, inference = started
        gateway = await asyncio.to_thread(
            start_service,
            "gateway",
            tmp_path,
            otel,
            auth_target=f"dns:///{auth.address}",
            inference_target=f"dns:///{inference.address}",
        )
        started.append(gateway)
        async with grpc.aio.insecure_channel(gateway.address) as channel:
            accounts = auth_pb2_grpc.AuthServiceStub(channel)
            password = "a passphrase for tracing"
            await accounts.Register(
                auth_pb2.RegisterRequest(username="tracy", email="tracy@example.com", password=password), timeout=10
            )
            login = await accounts.Login(auth_pb2.LoginRequest(username="tracy", password=password), timeout=10)
            call = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
                codec.make_infer_request("iris", {"input": ("FP32", np.array([[5.1, 3.5, 1.4, 0.2]], np.float32))}),
                metadata=(("authorization", f"Bearer {login.access_token}"),),
                timeout=10,
            )
            await call
            trace_id = dict(await call.trailing_metadata())["x-trace-id"]

        # Exactly the spans asserted, waited for by name: each process exports on its own schedule, so a trace
        # that has some span from every service may still lack the one looked for.
        expected = {
            "gateway": Counter({MODEL_INFER: 2, VALIDATE_TOKEN: 1}),  # its server span, and its calls to both
            "auth": Counter({VALIDATE_TOKEN: 1}),
            "inference": Counter({MODEL_INFER: 1, "inference.dispatch": 1}),
            "inference-worker": Counter({"model.predict": 1}),
        }

        def missing() -> dict[str, Counter[str]]:
            arrived = receiver.spans.get(trace_id, {})
            gaps = {service: names - Counter(arrived.get(service, [])) for service, names in expected.items()}
            return {service: gap for service, gap in gaps.items() if gap}

        try:
            await eventually(lambda: not missing(), 30)
        except TimeoutError:
            raise AssertionError(
                f"spans of {trace_id} missing: {missing()}; arrived: {dict(receiver.spans.get(trace_id, {}))}"
            ) from None

        def logged(process: ServiceProcess, service: str) -> bool:
            return any(
                json.loads(line).get("trace_id") == trace_id and json.loads(line).get("service") == service
                for line in process.raw
                if line.startswith("{")
            )

        await eventually(
            lambda: (
                logged(gateway, "gateway")
                and logged(auth, "auth")
                and logged(inference, "inference")
                and logged(inference, "inference-worker")
            ),
            10,
        )
    finally:
        for process in reversed(started):
            await asyncio.to_thread(process.stop)
