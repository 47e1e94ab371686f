"""Settings of the inference service (environment prefix ``INFERENCE_``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.common.settings import ServiceSettings
from services.inference.limits import (
    DEFAULT_MAX_ANSWER_BYTES,
    DEFAULT_MAX_OUTPUT_ELEMENTS,
    DEFAULT_MAX_REQUEST_ELEMENTS,
)


class InferenceSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="INFERENCE_")

    port: int = Field(default=50053, ge=0, le=65535, description="gRPC port (0 picks a free port).")
    metrics_port: int = Field(default=9103, ge=0, le=65535, description="Prometheus /metrics HTTP port.")
    max_message_bytes: int = Field(
        default=DEFAULT_MAX_ANSWER_BYTES, ge=1024, le=2**31 - 1, description="Largest gRPC message received or sent."
    )
    max_request_elements: int = Field(
        default=DEFAULT_MAX_REQUEST_ELEMENTS,
        ge=1,
        le=2**40,
        description="Most elements the inputs of one inference may have together; more: RESOURCE_EXHAUSTED.",
    )
    max_output_elements: int = Field(
        default=DEFAULT_MAX_OUTPUT_ELEMENTS,
        ge=1,
        le=2**40,
        description="Most elements the outputs of one inference may have together, computed from the model's"
        " declared output shapes before it runs; more: RESOURCE_EXHAUSTED.",
    )
    always_raw_outputs: bool = Field(
        default=False,
        description="Answer in raw_output_contents even to typed inputs, as Triton does (false: typed inputs get"
        " typed contents); a request's raw_output parameter decides for that request.",
    )
    shared_memory_enabled: bool = Field(
        default=False,
        description="Serve Triton's system shared-memory extension to clients on this host (off: its calls, and"
        " inferences that name a region, are FAILED_PRECONDITION).",
    )
    shared_memory_key_prefix: str = Field(
        default="",
        max_length=200,
        description="Every shared-memory key a client registers must start with this (a leading '/' aside);"
        " empty: any key. Keys of the service's own segments (mlp-...) are refused whatever it is.",
    )
    shared_memory_max_regions_per_client: int = Field(
        default=16,
        ge=1,
        le=4096,
        description="Shared-memory regions one client (one IP address; all of this host over loopback) may hold.",
    )
    shared_memory_max_bytes_per_client: int = Field(
        default=1 << 30,
        ge=1,
        le=1 << 44,
        description="Bytes the shared-memory regions of one client may span together.",
    )
    model_repository: Path = Field(default=Path("models"), description="Directory of the model repository.")
    timeout_seconds: float = Field(
        default=2.0, gt=0, le=600, description="Default deadline of one inference (a model's config may override)."
    )
    health_interval_seconds: float = Field(default=1.0, gt=0, le=60, description="How often each worker is pinged.")
    health_timeout_seconds: float = Field(
        default=1.0, gt=0, le=60, description="A worker that does not answer a ping this fast is replaced."
    )
    queue_limit: int = Field(
        default=64, ge=0, le=100_000, description="Requests that may wait per model version; more: RESOURCE_EXHAUSTED."
    )
    worker_start_timeout_seconds: float = Field(
        default=120.0, gt=0, description="How long a worker may take to load its model."
    )
    worker_stop_grace_seconds: float = Field(
        default=2.0, ge=0, le=60, description="Between SIGTERM and SIGKILL when a worker is stopped."
    )
    restart_backoff_seconds: float = Field(
        default=0.5, gt=0, le=60, description="First delay before restarting a crashed worker; doubles per crash."
    )
    abandon_grace_seconds: float = Field(
        default=0.5,
        ge=0,
        le=60,
        description="A worker whose caller gave up (deadline, cancellation) may finish within this; else it is killed.",
    )
    restart_backoff_max_seconds: float = Field(default=30.0, gt=0, le=3600, description="Longest restart delay.")
    repository_poll_seconds: float = Field(
        default=0.0, ge=0, le=3600, description="How often the repository is checked for changes (0 = never)."
    )
    autoscale_interval_seconds: float = Field(
        default=1.0, gt=0, le=60, description="How often each pool looks at its load to scale."
    )
    worker_cpu_budget: int = Field(
        default=0,
        ge=0,
        le=1024,
        description="Most workers the autoscaler grows one pool to (never below its instances.min); 0 = the CPUs"
        " this process may use, minus one for the supervisor (at least 1).",
    )
    scale_cooldown_seconds: float = Field(
        default=5.0, ge=0, le=3600, description="Least time between two scaling steps of a pool."
    )
    scale_down_idle_seconds: float = Field(
        default=30.0, gt=0, le=86400, description="A pool idle this long shrinks by one worker (not below min)."
    )
    shm_threshold_bytes: int = Field(
        default=64 * 1024, ge=0, description="Tensors this large or larger go to workers through shared memory."
    )
    shm_arena_bytes: int = Field(
        default=0,
        ge=0,
        description="Initial size of each worker's two reusable shared-memory arenas (0: what the first request needs).",
    )
    shm_arena_max_bytes: int = Field(
        default=64 * 1024 * 1024,
        ge=0,
        description="Largest arena; a request whose tensors need more uses segments of its own (0: no arenas).",
    )
