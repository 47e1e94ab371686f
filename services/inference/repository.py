"""The model repository: a directory of models, each with a config file and numbered versions.

Layout::

    <repository>/
        <model>/                  name matches [A-Za-z0-9_.-]+ (hidden directories are skipped)
            config.yaml           or config.json (not both)
            1/                    versions: positive integer directory names
                model.skops       the artifact; its name depends on the runtime
            3/ ...

``config.yaml`` (every field but ``runtime``, ``inputs`` and ``outputs`` is optional; unknown
fields are errors)::

    runtime: sklearn            # sklearn | onnx | python
    platform: ""                # free text for metadata; "" = derived from runtime
    max_batch_size: 0           # 0 = no batching dimension; N > 0 = the first dimension of
                                # every tensor is the batch (declared -1), at most N rows
    dynamic_batching:           # needs max_batch_size > 0: waiting requests ride one worker call
      max_queue_delay_microseconds: 0   # how long a batch may wait for more rows (from its oldest request)
      preferred_batch_size: [4, 8]      # sizes that go at once
    inputs:
      - {name: input, datatype: FP32, shape: [-1, 4]}     # -1 = variable dimension
    outputs:
      - {name: label, datatype: INT64, shape: [-1]}
    instances: {min: 1, max: 2}   # worker processes per version, 1 <= min <= max <= 16
    timeout_seconds: 2.0          # per-model request deadline; absent = the server's default
    version_policy: {latest: 1}   # or {all: true} or {specific: [1, 3]}
    parameters: {}                # runtime-specific

Nothing here imports gRPC or a runtime: the server process scans the repository, the worker
processes load the artifacts (:mod:`services.inference.runtimes`).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

CONFIG_FILES = ("config.yaml", "config.json")
MODEL_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_VERSION_NAME = re.compile(r"[1-9][0-9]*")
MAX_INSTANCES = 16

RuntimeName = Literal["sklearn", "onnx", "python"]
Datatype = Literal[
    "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64", "BYTES"
]

#: The numpy dtype of each Open Inference Protocol datatype. BYTES tensors are object arrays of
#: ``bytes``. BF16 is not supported: numpy has no bfloat16 type.
NUMPY_DTYPES: Mapping[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(np.object_),
}

DEFAULT_PLATFORMS: Mapping[str, str] = {"sklearn": "sklearn", "onnx": "onnxruntime_onnx", "python": "python"}


class ConfigError(ValueError):
    """A model's config is missing or invalid; the message names the file and the field."""


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """A declared input or output: name, OIP datatype, shape (-1 = any size)."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    @property
    def dtype(self) -> np.dtype[Any]:
        """The numpy dtype of this tensor's elements."""
        return NUMPY_DTYPES[self.datatype]

    def accepts_shape(self, shape: Sequence[int]) -> bool:
        """Whether a tensor of ``shape`` fits: same rank, each fixed dimension equal."""
        return len(shape) == len(self.shape) and all(
            size >= 0 and declared in (-1, size) for declared, size in zip(self.shape, shape, strict=True)
        )


@dataclass(frozen=True, slots=True)
class LatestVersions:
    """Serve the ``count`` highest versions present."""

    count: int = 1


@dataclass(frozen=True, slots=True)
class AllVersions:
    """Serve every version present."""


@dataclass(frozen=True, slots=True)
class SpecificVersions:
    """Serve those of ``versions`` that are present."""

    versions: tuple[int, ...]


VersionPolicy = LatestVersions | AllVersions | SpecificVersions


@dataclass(frozen=True, slots=True)
class DynamicBatching:
    """Triton's ``dynamic_batching``: requests waiting for a worker are joined along the batch dimension."""

    max_queue_delay_microseconds: int = 0
    preferred_batch_size: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """A validated model config. Equal configs compare equal (``parameters`` is not hashed)."""

    name: str
    runtime: RuntimeName
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    platform: str = ""
    max_batch_size: int = 0
    min_workers: int = 1
    max_workers: int = 1
    timeout_seconds: float | None = None
    version_policy: VersionPolicy = LatestVersions(1)
    parameters: dict[str, Any] = field(default_factory=dict, hash=False)
    dynamic_batching: DynamicBatching | None = None


@dataclass(frozen=True, slots=True)
class ModelEntry:
    """One model directory found by :func:`scan`: usable when ``error`` is empty.

    ``versions`` are the versions selected by the policy; ``digest`` is :func:`config_digest`
    at scan time, so a later scan can tell a changed config.
    """

    name: str
    path: Path
    config: ModelConfig | None
    versions: list[int] = field(hash=False)
    error: str = ""
    digest: str = ""

    @property
    def ok(self) -> bool:
        return not self.error


# --- The config file schema (pydantic): strict types, unknown fields forbidden. ---


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class _Tensor(_Strict):
    name: str = Field(min_length=1)
    datatype: Datatype
    shape: list[int] = Field(min_length=1)

    @field_validator("shape")
    @classmethod
    def _dimensions(cls, shape: list[int]) -> list[int]:
        if any(size < 1 and size != -1 for size in shape):
            raise ValueError(f"dimensions must be positive or -1 (variable), got {shape}")
        return shape


class _Instances(_Strict):
    min: int = Field(default=1, ge=1, le=MAX_INSTANCES)
    max: int = Field(default=1, ge=1, le=MAX_INSTANCES)

    @model_validator(mode="after")
    def _ordered(self) -> _Instances:
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) must not exceed max ({self.max})")
        return self


class _VersionPolicy(_Strict):
    latest: int | None = Field(default=None, ge=1)
    all: bool | None = None
    specific: list[int] | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _exactly_one(self) -> _VersionPolicy:
        given = [key for key in ("latest", "all", "specific") if getattr(self, key) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of latest, all, specific (got {', '.join(given) or 'none'})")
        if self.all is False:
            raise ValueError("all must be true (use latest or specific to serve fewer versions)")
        if self.specific is not None and any(version < 1 for version in self.specific):
            raise ValueError(f"specific versions must be positive integers, got {self.specific}")
        return self

    def policy(self) -> VersionPolicy:
        if self.latest is not None:
            return LatestVersions(self.latest)
        if self.specific is not None:
            return SpecificVersions(tuple(sorted(set(self.specific))))
        return AllVersions()


class _DynamicBatching(_Strict):
    max_queue_delay_microseconds: int = Field(default=0, ge=0, le=10_000_000)
    preferred_batch_size: list[int] = Field(default_factory=list)

    @field_validator("preferred_batch_size")
    @classmethod
    def _positive(cls, sizes: list[int]) -> list[int]:
        if any(size < 1 for size in sizes):
            raise ValueError(f"preferred batch sizes must be positive, got {sizes}")
        return sizes


class _ConfigFile(_Strict):
    runtime: RuntimeName
    platform: str = ""
    max_batch_size: int = Field(default=0, ge=0)
    inputs: list[_Tensor] = Field(min_length=1)
    outputs: list[_Tensor] = Field(min_length=1)
    instances: _Instances = _Instances()
    timeout_seconds: float | None = Field(default=None, gt=0, le=3600)
    version_policy: _VersionPolicy = _VersionPolicy(latest=1)
    parameters: dict[str, Any] = Field(default_factory=dict)
    dynamic_batching: _DynamicBatching | None = None

    @field_validator("inputs", "outputs")
    @classmethod
    def _unique_names(cls, tensors: list[_Tensor]) -> list[_Tensor]:
        names = [tensor.name for tensor in tensors]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"duplicate tensor names {duplicates}")
        return tensors

    @model_validator(mode="after")
    def _batch_dimension(self) -> _ConfigFile:
        if self.max_batch_size > 0:
            unbatched = [tensor.name for tensor in (*self.inputs, *self.outputs) if tensor.shape[0] != -1]
            if unbatched:
                raise ValueError(
                    f"max_batch_size > 0 needs -1 (the batch) as first dimension of every tensor; not so for {unbatched}"
                )
        if self.dynamic_batching is not None:
            if self.max_batch_size == 0:
                raise ValueError("dynamic_batching needs max_batch_size > 0 (a batch dimension)")
            too_big = [size for size in self.dynamic_batching.preferred_batch_size if size > self.max_batch_size]
            if too_big:
                raise ValueError(f"preferred_batch_size {too_big} larger than max_batch_size {self.max_batch_size}")
        return self


def _field_path(location: Sequence[int | str]) -> str:
    path = ""
    for part in location:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else part)
    return path


def _describe(error: ValidationError) -> str:
    problems = []
    for item in error.errors(include_url=False, include_input=False):
        message = "unknown field" if item["type"] == "extra_forbidden" else item["msg"].removeprefix("Value error, ")
        location = _field_path(item["loc"])
        problems.append(f"{location}: {message}" if location else message)
    return "; ".join(problems)


def parse_config(name: str, data: object, *, source: str = "config") -> ModelConfig:
    """Validate a config already read into Python objects (``source`` names it in errors)."""
    if not MODEL_NAME.fullmatch(name):
        raise ConfigError(f"{source}: invalid model name {name!r} (allowed: letters, digits, '_', '.', '-')")
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: must be a mapping of fields, got {type(data).__name__}")
    try:
        parsed = _ConfigFile.model_validate(data)
    except ValidationError as error:
        raise ConfigError(f"{source}: {_describe(error)}") from None

    def specs(tensors: list[_Tensor]) -> tuple[TensorSpec, ...]:
        return tuple(TensorSpec(t.name, t.datatype, tuple(t.shape)) for t in tensors)

    return ModelConfig(
        name=name,
        runtime=parsed.runtime,
        platform=parsed.platform or DEFAULT_PLATFORMS[parsed.runtime],
        max_batch_size=parsed.max_batch_size,
        inputs=specs(parsed.inputs),
        outputs=specs(parsed.outputs),
        min_workers=parsed.instances.min,
        max_workers=parsed.instances.max,
        timeout_seconds=parsed.timeout_seconds,
        version_policy=parsed.version_policy.policy(),
        parameters=dict(parsed.parameters),
        dynamic_batching=None
        if parsed.dynamic_batching is None
        else DynamicBatching(
            parsed.dynamic_batching.max_queue_delay_microseconds,
            tuple(sorted(set(parsed.dynamic_batching.preferred_batch_size))),
        ),
    )


def config_path(model_dir: Path) -> Path:
    """The config file of ``model_dir``; ConfigError if there is none or there are two."""
    present = [model_dir / file for file in CONFIG_FILES if (model_dir / file).is_file()]
    if not present:
        raise ConfigError(f"{model_dir}: no {' or '.join(CONFIG_FILES)}")
    if len(present) > 1:
        raise ConfigError(f"{model_dir}: both {' and '.join(CONFIG_FILES)}; keep one")
    return present[0]


def load_config(model_dir: Path) -> ModelConfig:
    """Read and validate the config of the model in ``model_dir`` (named after the directory)."""
    path = config_path(model_dir)
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, yaml.YAMLError) as error:
        raise ConfigError(f"{path}: cannot be read: {error}") from None
    return parse_config(model_dir.name, data, source=str(path))


def config_digest(model_dir: Path) -> str:
    """sha256 (hex) of the config file's bytes; "" when there is none (of both, if both exist)."""
    digest = hashlib.sha256()
    found = False
    for file in CONFIG_FILES:
        path = model_dir / file
        if path.is_file():
            digest.update(path.read_bytes())
            found = True
    return digest.hexdigest() if found else ""


def available_versions(model_dir: Path) -> list[int]:
    """The version directories of ``model_dir`` (positive integer names), ascending."""
    if not model_dir.is_dir():
        return []
    return sorted(
        int(item.name) for item in model_dir.iterdir() if _VERSION_NAME.fullmatch(item.name) and item.is_dir()
    )


def select_versions(config: ModelConfig, available: Sequence[int]) -> list[int]:
    """The versions to serve, ascending, by the config's version policy."""
    present = sorted(set(available))
    match config.version_policy:
        case LatestVersions(count):
            return present[-count:]
        case SpecificVersions(versions):
            return [version for version in present if version in versions]
        case AllVersions():
            return present


def _entry(model_dir: Path) -> ModelEntry:
    name = model_dir.name
    digest = config_digest(model_dir)
    try:
        config = load_config(model_dir)
    except ConfigError as error:
        return ModelEntry(name, model_dir, None, [], str(error), digest)
    available = available_versions(model_dir)
    if not available:
        return ModelEntry(name, model_dir, config, [], f"{model_dir}: no version directories (1, 2, ...)", digest)
    selected = select_versions(config, available)
    if not selected:
        problem = f"{model_dir}: none of the versions of the policy are present (present: {available})"
        return ModelEntry(name, model_dir, config, [], problem, digest)
    return ModelEntry(name, model_dir, config, selected, "", digest)


def scan(repository: Path) -> dict[str, ModelEntry]:
    """Every model directory of ``repository`` by name, sorted; broken models carry ``error``.

    Only an unreadable repository raises (FileNotFoundError / NotADirectoryError).
    """
    if not repository.is_dir():
        if repository.exists():
            raise NotADirectoryError(f"model repository {repository} is not a directory")
        raise FileNotFoundError(f"model repository {repository} does not exist")
    entries: dict[str, ModelEntry] = {}
    for model_dir in sorted(repository.iterdir()):
        if model_dir.name.startswith(".") or not model_dir.is_dir():
            continue
        if not MODEL_NAME.fullmatch(model_dir.name):
            problem = f"{model_dir}: invalid model name (allowed: letters, digits, '_', '.', '-')"
            entries[model_dir.name] = ModelEntry(model_dir.name, model_dir, None, [], problem)
            continue
        entries[model_dir.name] = _entry(model_dir)
    return entries


__all__ = [
    "CONFIG_FILES",
    "DEFAULT_PLATFORMS",
    "NUMPY_DTYPES",
    "AllVersions",
    "ConfigError",
    "Datatype",
    "LatestVersions",
    "ModelConfig",
    "ModelEntry",
    "RuntimeName",
    "SpecificVersions",
    "TensorSpec",
    "VersionPolicy",
    "available_versions",
    "config_digest",
    "config_path",
    "load_config",
    "parse_config",
    "scan",
    "select_versions",
]
