"""``inference.GRPCInferenceService``: the Open Inference Protocol (KServe V2) endpoints.

Thin: protobuf tensors are decoded and validated by :mod:`codec`, the request's cost is bounded
by :mod:`limits` before the model runs, the model is resolved and run by :class:`ModelManager`,
and the answer is encoded back (raw outputs whenever the request used raw inputs, as tritonclient
expects, or always with ``INFERENCE_ALWAYS_RAW_OUTPUTS``; a request's ``raw_output`` parameter
decides for itself). Each inference is timed into the manager's statistics (:mod:`stats`);
ModelConfig and ModelStatistics (Triton's extensions) are built by :mod:`converters`; Triton's
system shared memory (regions, and tensors read from and written into them) is
:mod:`shared_memory`'s, the CUDA methods answer as a Triton server without GPUs. Names a
request carries are bounded (:func:`~services.inference.reasons.check_name`) before they reach
the manager, whose messages echo them.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Sequence

import grpc
from inference import grpc_service_pb2 as pb
from inference import grpc_service_pb2_grpc
from opentelemetry import propagate

from services.common.errors import Internal, InvalidArgument, ServiceError
from services.common.peer import peer_ip
from services.inference import codec, converters, limits, reasons, shared_memory
from services.inference.limits import RequestPolicy
from services.inference.manager import ModelManager
from services.inference.reasons import check_name
from services.inference.runtimes import input_policy
from services.inference.shared_memory import Caller, SharedMemoryRegistry

DEADLINE_MARGIN_SECONDS = 0.005  # answer DEADLINE_EXCEEDED ourselves just before the client gives up


def _check_model(name: str, version: str) -> None:
    """Bound the ``name`` and ``version`` fields of the metadata, config, ready and statistics requests."""
    check_name("name", name)
    check_name("version", version)


def _model_name_required(name: str) -> None:
    if not name:
        raise InvalidArgument(
            "model_name is required", [("model_name", "must not be empty")], reason=reasons.MODEL_NAME_REQUIRED
        )
    check_name("model_name", name)


def _caller(context: grpc.aio.ServicerContext) -> Caller:
    """Who calls, for shared memory: the peer's IP; proxied if a proxy (the gateway) forwarded the call."""
    proxied = any(key == "x-forwarded-for" for key, _ in context.invocation_metadata() or ())
    return Caller(client=peer_ip(context.peer() or ""), proxied=proxied)


def _traceparent() -> str:
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier.get("traceparent", "")


class InferenceServicer(grpc_service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(
        self,
        *,
        manager: ModelManager,
        name: str,
        version: str,
        extensions: Sequence[str],
        default_timeout: float,
        is_ready: Callable[[], bool],
        policy: RequestPolicy | None = None,
        shared: SharedMemoryRegistry | None = None,
    ):
        self._manager = manager
        self._shared = shared or SharedMemoryRegistry()
        self._metadata = pb.ServerMetadataResponse(name=name, version=version, extensions=list(extensions))
        self._default_timeout = default_timeout
        self._is_ready = is_ready
        self._policy = policy or RequestPolicy()

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._is_ready())

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        return self._metadata

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        _check_model(request.name, request.version)
        return pb.ModelReadyResponse(ready=self._manager.model_ready(request.name, request.version))

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        _check_model(request.name, request.version)
        model, _ = self._manager.resolve(request.name, request.version)
        config = self._manager.config(model)
        return pb.ModelMetadataResponse(
            name=model.name,
            versions=sorted(model.pools, key=int),
            platform=config.platform,
            inputs=[
                pb.ModelMetadataResponse.TensorMetadata(name=spec.name, datatype=spec.datatype, shape=list(spec.shape))
                for spec in config.inputs
            ],
            outputs=[
                pb.ModelMetadataResponse.TensorMetadata(name=spec.name, datatype=spec.datatype, shape=list(spec.shape))
                for spec in config.outputs
            ],
        )

    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelConfigResponse:
        _check_model(request.name, request.version)
        model, _ = self._manager.resolve(request.name, request.version)
        return pb.ModelConfigResponse(config=converters.model_config(self._manager.config(model)))

    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelStatisticsResponse:
        if request.version and not request.name:
            raise InvalidArgument(
                "a version needs a model name",
                [("name", "must be set when version is")],
                reason=reasons.MODEL_NAME_REQUIRED,
            )
        _check_model(request.name, request.version)
        return converters.model_statistics(self._manager.model_statistics(request.name, request.version))

    async def _infer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext) -> pb.ModelInferResponse:
        _model_name_required(request.model_name)
        check_name("model_version", request.model_version)
        model, pool = self._manager.resolve(request.model_name, request.model_version)
        config = self._manager.config(model)
        accepts = input_policy(config)
        policy = self._policy
        with (
            self._manager.statistics.request(model.name, pool.model_version) as timer,
            self._shared.bind(request, lambda: _caller(context)) as regions,
        ):
            with timer.measure("compute_input"):
                decoded = codec.decode_request(
                    request,
                    config.inputs,
                    policy.max_request_elements,
                    allow_zero_size=accepts.allow_zero_size,
                    supplied=regions.inputs,
                )
                codec.check_requested_outputs(decoded.requested_outputs, config.outputs)
                batch_size = codec.batch_size(decoded.inputs, config.max_batch_size, model.name)
                raw = codec.raw_outputs(decoded, policy.always_raw_outputs)
                if not accepts.allow_non_finite:
                    limits.check_finite(decoded.inputs, model.name)
                estimate = limits.output_estimate(
                    config.outputs,
                    config.inputs,
                    decoded.inputs,
                    batch=batch_size if config.max_batch_size > 0 else None,
                    returned=decoded.requested_outputs,
                )
                limits.check_outputs(estimate, policy, model.name)
            timeout = config.timeout_seconds or self._default_timeout
            remaining = context.time_remaining()
            if remaining is not None:
                timeout = min(timeout, remaining - DEADLINE_MARGIN_SECONDS)
            result = await self._manager.infer(
                pool,
                decoded.inputs,
                decoded.requested_outputs,
                deadline=time.time() + max(0.0, timeout),
                traceparent=_traceparent(),
                timer=timer,
            )
            with timer.measure("compute_output"):
                limits.check_answer_bytes(result.outputs, policy, model.name)
                try:
                    placed = regions.place(result.outputs, config.outputs)
                    response = codec.encode_response(
                        model_name=model.name,
                        model_version=pool.model_version,
                        request_id=decoded.id,
                        outputs=result.outputs,
                        specs=config.outputs,
                        requested=decoded.requested_outputs,
                        raw=raw,
                        placed=placed,
                    )
                except codec.ModelOutputError as error:
                    raise Internal(f"model {model.name} returned unusable outputs: {error}") from None
            timer.succeeded(batch_size)
        return response

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        return await self._infer(request, context)

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Triton's form: one answer per request, in order; a failure is an error_message, not the end."""
        async for request in request_iterator:
            try:
                response = await self._infer(request, context)
            except ServiceError as error:
                yield pb.ModelStreamInferResponse(error_message=f"{error.code.name}: {error.message}")
            else:
                yield pb.ModelStreamInferResponse(infer_response=response)

    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryIndexResponse:
        entries = self._manager.index()
        if request.ready:
            entries = [entry for entry in entries if entry.state == "READY"]
        return pb.RepositoryIndexResponse(
            models=[
                pb.RepositoryIndexResponse.ModelIndex(
                    name=entry.name, version=entry.version, state=entry.state, reason=entry.reason
                )
                for entry in entries
            ]
        )

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelLoadResponse:
        _model_name_required(request.model_name)
        await self._manager.load(request.model_name)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelUnloadResponse:
        _model_name_required(request.model_name)
        await self._manager.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()

    # -- Triton's shared memory extensions ------------------------------------------------------------------

    async def SystemSharedMemoryStatus(
        self, request: pb.SystemSharedMemoryStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.SystemSharedMemoryStatusResponse:
        regions = self._shared.status(_caller(context), request.name)
        return pb.SystemSharedMemoryStatusResponse(
            regions={
                region.name: pb.SystemSharedMemoryStatusResponse.RegionStatus(
                    name=region.name, key=region.key, offset=region.offset, byte_size=region.byte_size
                )
                for region in regions
            }
        )

    async def SystemSharedMemoryRegister(
        self, request: pb.SystemSharedMemoryRegisterRequest, context: grpc.aio.ServicerContext
    ) -> pb.SystemSharedMemoryRegisterResponse:
        self._shared.register(_caller(context), request.name, request.key, request.offset, request.byte_size)
        return pb.SystemSharedMemoryRegisterResponse()

    async def SystemSharedMemoryUnregister(
        self, request: pb.SystemSharedMemoryUnregisterRequest, context: grpc.aio.ServicerContext
    ) -> pb.SystemSharedMemoryUnregisterResponse:
        self._shared.unregister(_caller(context), request.name)
        return pb.SystemSharedMemoryUnregisterResponse()

    async def CudaSharedMemoryStatus(
        self, request: pb.CudaSharedMemoryStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.CudaSharedMemoryStatusResponse:
        shared_memory.cuda_status(request.name)
        return pb.CudaSharedMemoryStatusResponse()

    async def CudaSharedMemoryRegister(
        self, request: pb.CudaSharedMemoryRegisterRequest, context: grpc.aio.ServicerContext
    ) -> pb.CudaSharedMemoryRegisterResponse:
        shared_memory.cuda_register(request.name)
        return pb.CudaSharedMemoryRegisterResponse()

    async def CudaSharedMemoryUnregister(
        self, request: pb.CudaSharedMemoryUnregisterRequest, context: grpc.aio.ServicerContext
    ) -> pb.CudaSharedMemoryUnregisterResponse:
        check_name("name", request.name)
        return pb.CudaSharedMemoryUnregisterResponse()
