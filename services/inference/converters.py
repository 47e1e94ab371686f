"""Domain objects -> Triton's extension messages: ModelConfig and ModelStatistics.

Plain functions over the generated ``inference`` messages; nothing here knows gRPC. The layouts
are Triton's (``model_config.proto`` and ``grpc_service.proto`` of triton-inference-server/common),
so tritonclient's ``get_model_config`` and ``get_inference_statistics`` read them unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from types import MappingProxyType

from inference import grpc_service_pb2 as pb
from inference import model_config_pb2 as config_pb

from services.inference.repository import AllVersions, LatestVersions, ModelConfig, SpecificVersions, TensorSpec
from services.inference.stats import Duration, VersionStatistics

BACKENDS: Mapping[str, str] = MappingProxyType({"onnx": "onnxruntime", "python": "python", "sklearn": "sklearn"})
"""Our runtime -> the backend name Triton uses for the same kind of model."""

ARTIFACTS: Mapping[str, str] = MappingProxyType({"onnx": "model.onnx", "python": "model.py", "sklearn": "model.skops"})
"""Our runtime -> the artifact file in a version directory (python: ``parameters.module`` if set)."""


def data_type(datatype: str) -> config_pb.DataType.ValueType:
    """The ``DataType`` of an Open Inference Protocol datatype (BYTES is TYPE_STRING)."""
    return config_pb.DataType.Value("TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}")


def _dims(spec: TensorSpec, batched: bool) -> list[int]:
    """Triton leaves the batch dimension out of ``dims`` when the model batches."""
    return list(spec.shape[1:] if batched else spec.shape)


def _version_policy(config: ModelConfig) -> config_pb.ModelVersionPolicy:
    match config.version_policy:
        case LatestVersions(count):
            return config_pb.ModelVersionPolicy(latest=config_pb.ModelVersionPolicy.Latest(num_versions=count))
        case SpecificVersions(versions):
            return config_pb.ModelVersionPolicy(specific=config_pb.ModelVersionPolicy.Specific(versions=list(versions)))
        case AllVersions():
            return config_pb.ModelVersionPolicy(all=config_pb.ModelVersionPolicy.All())


def _parameter(value: object) -> config_pb.ModelParameter:
    return config_pb.ModelParameter(string_value=value if isinstance(value, str) else json.dumps(value))


def model_config(config: ModelConfig) -> config_pb.ModelConfig:
    """Triton's ``ModelConfig`` of one of our model configs.

    ``instance_group`` is one CPU group whose count is the configured minimum of worker processes
    per served version (the autoscaler may add up to ``instances.max``: the ``instances_max``
    parameter says how many).
    """
    batched = config.max_batch_size > 0
    artifact = ARTIFACTS[config.runtime]
    if config.runtime == "python":
        artifact = str(config.parameters.get("module", artifact))
    parameters = {key: _parameter(value) for key, value in sorted(config.parameters.items())}
    parameters["instances_max"] = _parameter(str(config.max_workers))
    if config.timeout_seconds is not None:
        parameters["timeout_seconds"] = _parameter(f"{config.timeout_seconds:g}")
    return config_pb.ModelConfig(
        name=config.name,
        platform=config.platform,
        backend=BACKENDS[config.runtime],
        version_policy=_version_policy(config),
        max_batch_size=config.max_batch_size,
        input=[
            config_pb.ModelInput(name=spec.name, data_type=data_type(spec.datatype), dims=_dims(spec, batched))
            for spec in config.inputs
        ],
        output=[
            config_pb.ModelOutput(name=spec.name, data_type=data_type(spec.datatype), dims=_dims(spec, batched))
            for spec in config.outputs
        ],
        instance_group=[
            config_pb.ModelInstanceGroup(
                name=config.name, kind=config_pb.ModelInstanceGroup.KIND_CPU, count=config.min_workers
            )
        ],
        default_model_filename=artifact,
        parameters=parameters,
        dynamic_batching=None
        if config.dynamic_batching is None
        else config_pb.ModelDynamicBatching(
            preferred_batch_size=config.dynamic_batching.preferred_batch_size,
            max_queue_delay_microseconds=config.dynamic_batching.max_queue_delay_microseconds,
        ),
    )


def _duration(duration: Duration) -> pb.StatisticDuration:
    return pb.StatisticDuration(count=duration.count, ns=duration.ns)


def model_statistics(rows: Iterable[VersionStatistics]) -> pb.ModelStatisticsResponse:
    """Triton's ``ModelStatisticsResponse`` of some model versions' statistics."""
    return pb.ModelStatisticsResponse(
        model_stats=[
            pb.ModelStatistics(
                name=row.name,
                version=row.version,
                last_inference=row.last_inference_ms,
                inference_count=row.inference_count,
                execution_count=row.execution_count,
                inference_stats=pb.InferStatistics(
                    success=_duration(row.success),
                    fail=_duration(row.fail),
                    queue=_duration(row.queue),
                    compute_input=_duration(row.compute_input),
                    compute_infer=_duration(row.compute_infer),
                    compute_output=_duration(row.compute_output),
                ),
                batch_stats=[
                    pb.InferBatchStatistics(
                        batch_size=batch.batch_size,
                        compute_input=_duration(batch.compute_input),
                        compute_infer=_duration(batch.compute_infer),
                        compute_output=_duration(batch.compute_output),
                    )
                    for batch in row.batches
                ],
            )
            for row in rows
        ]
    )


__all__ = ["ARTIFACTS", "BACKENDS", "data_type", "model_config", "model_statistics"]
