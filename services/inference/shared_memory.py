"""Triton's system shared-memory extension: regions of POSIX shared-memory objects that a client on
this host registers, and inference inputs read from and outputs written into them.

Plain Python over the generated ``inference`` messages; nothing here knows gRPC. The servicer says
who calls (:class:`Caller`) and hands over the messages; the registry answers or raises a
:class:`~services.common.errors.ServiceError` with a reason from :mod:`services.inference.reasons`.

As Triton does, a client creates an object (``/dev/shm/<key>``, e.g. with
``tritonclient.utils.shared_memory``), registers a region of it under a name
(SystemSharedMemoryRegister: name, key, offset, byte_size), and names the region in an input's or a
requested output's parameters ``shared_memory_region`` (string), ``shared_memory_byte_size`` and
``shared_memory_offset`` (int64, offset optional) instead of sending the bytes. An input in a region
carries no raw or typed contents; an output written into a region comes back with its name, datatype
and shape, an empty ``raw_output_contents`` entry (so the entries still match the outputs by
position), no typed contents, and those parameters echoed (``shared_memory_byte_size`` = the bytes
written). A request with an input in a region is answered raw, as one with raw inputs is.

Safe by construction:

* Off unless :attr:`SharedMemoryPolicy.enabled`: every system shared-memory call, and an inference
  that names a region, is FAILED_PRECONDITION (``SHARED_MEMORY_DISABLED``).
* A call that came through a proxy (the gateway sets ``x-forwarded-for``) is FAILED_PRECONDITION
  (``SHARED_MEMORY_NOT_LOCAL``): a region is memory on this host, shared with a client on this host.
* A key is one name in ``/dev/shm`` (leading ``/`` as ``shm_open`` takes it; no other ``/``, not ``.``
  or ``..``, at most 255 bytes), starts with :attr:`SharedMemoryPolicy.key_prefix` and never with one
  of :attr:`SharedMemoryPolicy.reserved_prefixes` (the service's own worker segments). The object is
  opened read-write without following a symlink, and must be a regular file with no other name.
* Regions are held as open file descriptors and read and written with ``pread``/``pwrite``, never
  mapped: a client that shrinks its object after registering cannot make the service fault (SIGBUS)
  or read past the end; the short read or the smaller size is FAILED_PRECONDITION instead.
* Offsets and sizes are checked against the object's size at registration and against the region on
  every use (INVALID_ARGUMENT with field violations); an input's byte size must be what its shape and
  datatype take, an output must fit the bytes given for it.
* Each client (:attr:`Caller.client`: the peer's IP address, so every process on this host that
  connects over loopback is one client) may hold at most :attr:`SharedMemoryPolicy.max_regions`
  regions of :attr:`SharedMemoryPolicy.max_bytes` bytes together (RESOURCE_EXHAUSTED); a region keeps
  counting until its descriptor is closed.
* A region unregistered while a request uses it is closed when that request ends; :meth:`close`
  (at shutdown) closes everything.

Region names are one namespace for the whole server, as in Triton: any caller may list or unregister
any region, and unregistering a name that is not registered succeeds.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy.typing as npt
from inference import grpc_service_pb2 as pb

from services.common.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from services.inference import codec, ipc, reasons
from services.inference.reasons import check_name, clip

if TYPE_CHECKING:
    from services.inference.settings import InferenceSettings

SHM_DIR: Final = Path("/dev/shm")  # noqa: S108  (the tmpfs of POSIX shared memory, not a temporary directory)
EXTENSION: Final = "system_shared_memory"
"""The name ServerMetadata lists when the extension is enabled."""
SERVICE_SEGMENT_PREFIX: Final = ipc.SERVICE_PREFIX
"""How the service's own worker segments begin (``mlp-<supervisor pid>-<worker id>-...``): never a key."""
REGION: Final = "shared_memory_region"
BYTE_SIZE: Final = "shared_memory_byte_size"
OFFSET: Final = "shared_memory_offset"
PARAMETERS: Final = (REGION, BYTE_SIZE, OFFSET)
NOT_LOCAL_MESSAGE: Final = (
    "shared memory needs a client on the same host as the inference service: register regions and send the "
    "requests that name them to the inference service directly, not through the gateway"
)
_NAME_MAX = 255  # bytes in one file name
_OPEN_FLAGS = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


@dataclass(frozen=True, slots=True)
class SharedMemoryPolicy:
    """What the registry allows (from :class:`~services.inference.settings.InferenceSettings`)."""

    enabled: bool = False
    key_prefix: str = ""
    """Every key (without its leading ``/``) starts with this; empty: any key."""
    max_regions: int = 16
    """Regions one client may hold."""
    max_bytes: int = 1 << 30
    """Bytes the regions of one client may span together."""
    reserved_prefixes: tuple[str, ...] = (SERVICE_SEGMENT_PREFIX,)
    """Keys that are never registered: the service's own segments."""
    directory: Path = SHM_DIR

    @classmethod
    def from_settings(cls, settings: InferenceSettings) -> SharedMemoryPolicy:
        return cls(
            enabled=settings.shared_memory_enabled,
            key_prefix=settings.shared_memory_key_prefix,
            max_regions=settings.shared_memory_max_regions_per_client,
            max_bytes=settings.shared_memory_max_bytes_per_client,
        )


@dataclass(frozen=True, slots=True)
class Caller:
    """Who makes a call, as far as the registry cares."""

    client: str
    """What the per-client bounds count against: the peer's IP address (``unix`` for a Unix socket)."""
    proxied: bool = False
    """The call came through a proxy (it carries ``x-forwarded-for``)."""


@dataclass(frozen=True, slots=True)
class RegionStatus:
    name: str
    key: str
    offset: int
    byte_size: int


@dataclass(eq=False, slots=True)
class _Region:
    name: str
    key: str
    offset: int
    byte_size: int
    client: str
    fd: int
    leases: int = 0
    registered: bool = True

    def end_in_object(self) -> int:
        return self.offset + self.byte_size

    def read(self, offset: int, size: int, what: str) -> bytes:
        """``size`` bytes at ``offset`` in the region."""
        fd, start = self._open_fd(), self.offset + offset
        try:
            data = os.pread(fd, size, start)
            if len(data) < size:  # the object's end, or the kernel's cap on one read (2 GiB)
                parts, done = [data], len(data)
                while done < size:
                    part = os.pread(fd, size - done, start + done)
                    if not part:
                        raise self._unusable(what, f"its object shrank below the {self.byte_size} bytes registered")
                    parts.append(part)
                    done += len(part)
                data = b"".join(parts)
        except OSError as error:
            raise self._unusable(what, f"reading it failed: {error.strerror or type(error).__name__}") from None
        return data

    def write(self, offset: int, data: memoryview, what: str) -> None:
        fd = self._open_fd()
        try:
            if os.fstat(fd).st_size < self.end_in_object():  # a write past the end would grow the object
                raise self._unusable(what, f"its object shrank below the {self.byte_size} bytes registered")
            done = 0
            while done < len(data):
                done += os.pwrite(fd, data[done:], self.offset + offset + done)
        except OSError as error:  # e.g. ENOSPC: the tmpfs is full (the object's pages are allocated on write)
            raise self._unusable(what, f"writing it failed: {error.strerror or type(error).__name__}") from None

    def _unusable(self, what: str, why: str) -> FailedPrecondition:
        return FailedPrecondition(
            f"{what}: shared memory region {clip(self.name)!r} (object {clip(self.key)!r}) cannot be used: {why}",
            reason=reasons.SHARED_MEMORY_OBJECT_UNUSABLE,
        )

    def _open_fd(self) -> int:
        if self.fd < 0:
            raise Unavailable("the service is shutting down; its shared memory regions are closed")
        return self.fd

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)


@dataclass(frozen=True, slots=True)
class _Placement:
    """One tensor in a region: ``byte_size`` bytes at ``offset`` of the region."""

    region: _Region
    offset: int
    byte_size: int
    where: str
    """The tensor's field path, ``inputs[NAME]`` or ``outputs[NAME]``."""


@dataclass(slots=True)
class Binding:
    """The regions of one inference request, leased until it ends (see :meth:`SharedMemoryRegistry.bind`).

    ``inputs`` (None when no input is in a region) is what
    :func:`~services.inference.codec.decode_request` takes as ``supplied``; :meth:`place` writes the
    outputs that go into regions.
    """

    _inputs: dict[str, _Placement] = field(default_factory=dict)
    _outputs: dict[str, _Placement] = field(default_factory=dict)

    @property
    def inputs(self) -> Binding | None:
        return self if self._inputs else None

    def __contains__(self, name: object) -> bool:
        return name in self._inputs

    def read(self, name: str, datatype: str, count: int) -> bytes:
        """The bytes of input ``name`` from its region; INVALID_ARGUMENT if their size does not fit."""
        placement = self._inputs[name]
        size = codec.ELEMENT_SIZES.get(datatype)
        if size is not None and placement.byte_size != count * size:
            raise InvalidArgument(
                f"input {clip(name)!r}: {BYTE_SIZE} is {placement.byte_size}, its shape and datatype take "
                f"{count * size} bytes ({count} x {datatype})",
                [(f"{placement.where}.parameters[{BYTE_SIZE}]", f"must be {count * size}")],
                reason=reasons.SHARED_MEMORY_SIZE_MISMATCH,
            )
        return placement.region.read(placement.offset, placement.byte_size, f"input {clip(name)!r}")

    def place(
        self, outputs: Mapping[str, npt.NDArray[Any]], specs: Sequence[codec.SpecLike]
    ) -> dict[str, dict[str, codec.ParameterValue]]:
        """Write the outputs that go into regions; their parameters for the answer, by output name.

        Every such output is checked to fit before any is written (INVALID_ARGUMENT,
        ``SHARED_MEMORY_OUTPUT_TOO_LARGE``); :class:`~services.inference.codec.ModelOutputError` if the
        model's output does not fit its declaration.
        """
        if not self._outputs:
            return {}
        declared = {spec.name: spec for spec in specs}
        data: dict[str, memoryview] = {}
        for name, placement in self._outputs.items():
            if name not in outputs:
                raise codec.ModelOutputError(f"the model returned no output {name!r}")
            raw = memoryview(codec.raw_output(outputs[name], declared[name])).cast("B")
            if len(raw) > placement.byte_size:
                raise InvalidArgument(
                    f"output {clip(name)!r} takes {len(raw)} bytes, more than the {placement.byte_size} bytes of "
                    f"shared memory given for it",
                    [(f"{placement.where}.parameters[{BYTE_SIZE}]", f"must be at least {len(raw)}")],
                    reason=reasons.SHARED_MEMORY_OUTPUT_TOO_LARGE,
                )
            data[name] = raw
        placed: dict[str, dict[str, codec.ParameterValue]] = {}
        for name, placement in self._outputs.items():
            placement.region.write(placement.offset, data[name], f"output {clip(name)!r}")
            echoed: dict[str, codec.ParameterValue] = {REGION: placement.region.name, BYTE_SIZE: len(data[name])}
            if placement.offset:
                echoed[OFFSET] = placement.offset
            placed[name] = echoed
        return placed


def in_use(request: pb.ModelInferRequest) -> bool:
    """Whether an input or requested output of ``request`` carries a shared-memory parameter."""
    return any(_names_region(tensor.parameters) for tensor in request.inputs) or any(
        _names_region(output.parameters) for output in request.outputs
    )


def _names_region(parameters: Mapping[str, pb.InferParameter]) -> bool:
    return bool(parameters) and any(key in parameters for key in PARAMETERS)


class SharedMemoryRegistry:
    """The registered regions of one server (one event loop: no call here awaits, so none interleave)."""

    def __init__(self, policy: SharedMemoryPolicy | None = None):
        self._policy = policy or SharedMemoryPolicy()
        self._regions: dict[str, _Region] = {}
        self._open: set[_Region] = set()  # registered, or unregistered while a request still uses them

    @property
    def enabled(self) -> bool:
        return self._policy.enabled

    # -- SystemSharedMemoryRegister / Unregister / Status -------------------------------------------------

    def register(self, caller: Caller, name: str, key: str, offset: int, byte_size: int) -> None:
        self._check_caller(caller)
        _check_region_name("name", name)
        filename = self._check_key(key)
        if name in self._regions:
            raise AlreadyExists(
                f"shared memory region {clip(name)!r} is already registered",
                reason=reasons.SHARED_MEMORY_REGION_EXISTS,
            )
        if byte_size <= 0:
            raise InvalidArgument(
                "byte_size must be at least 1",
                [("byte_size", "must be at least 1")],
                reason=reasons.SHARED_MEMORY_OUT_OF_RANGE,
            )
        regions, spanned = self._usage(caller.client)
        if regions >= self._policy.max_regions:
            raise ResourceExhausted(
                f"this client already holds {regions} shared memory regions, the most one client may hold; "
                "unregister one first",
                reason=reasons.SHARED_MEMORY_TOO_MANY_REGIONS,
            )
        if spanned + byte_size > self._policy.max_bytes:
            raise ResourceExhausted(
                f"this client's regions would span {spanned + byte_size} bytes, more than the "
                f"{self._policy.max_bytes} bytes one client may register",
                reason=reasons.SHARED_MEMORY_TOO_MANY_BYTES,
            )
        fd = self._open_object(filename, key)
        try:
            size = os.fstat(fd).st_size
            if offset + byte_size > size:
                raise InvalidArgument(
                    f"offset {offset} + byte_size {byte_size} is past the end of the object {clip(key)!r} "
                    f"({size} bytes)",
                    [("byte_size", f"offset + byte_size must be at most {size}")],
                    reason=reasons.SHARED_MEMORY_OUT_OF_RANGE,
                )
        except BaseException:
            os.close(fd)
            raise
        region = _Region(name, key, offset, byte_size, caller.client, fd)
        self._regions[name] = region
        self._open.add(region)

    def unregister(self, caller: Caller, name: str) -> None:
        """Unregister ``name`` (empty: every region); a name that is not registered is no error."""
        self._check_caller(caller)
        check_name("name", name)
        names = list(self._regions) if not name else [name] if name in self._regions else []
        for one in names:
            region = self._regions.pop(one)
            region.registered = False
            if not region.leases:
                self._close(region)

    def status(self, caller: Caller, name: str) -> list[RegionStatus]:
        """The region ``name`` (NOT_FOUND if it is not registered), or every region (empty name)."""
        self._check_caller(caller)
        check_name("name", name)
        if name and name not in self._regions:
            raise NotFound(
                f"no system shared memory region {clip(name)!r} is registered",
                reason=reasons.SHARED_MEMORY_REGION_NOT_FOUND,
            )
        chosen = [self._regions[name]] if name else list(self._regions.values())
        return [RegionStatus(r.name, r.key, r.offset, r.byte_size) for r in chosen]

    def close(self) -> None:
        """Close every region (at shutdown): requests that still hold one fail with UNAVAILABLE."""
        for region in list(self._open):
            self._close(region)
        self._regions.clear()

    async def aclose(self) -> None:
        """:meth:`close` as a server closer."""
        self.close()

    @property
    def open_regions(self) -> int:
        """Descriptors held: registered regions and unregistered ones that a request still uses."""
        return len(self._open)

    # -- inference -------------------------------------------------------------------------------------------

    @contextmanager
    def bind(self, request: pb.ModelInferRequest, caller: Callable[[], Caller]) -> Iterator[Binding]:
        """The request's tensors in regions, each region leased (kept open) until the block ends;
        ``caller`` is asked only if the request names a region."""
        binding = Binding()
        if not in_use(request):
            yield binding
            return
        self._check_caller(caller())
        leased: list[_Region] = []
        try:
            for index, tensor in enumerate(request.inputs):
                placement = self._placement("input", tensor.name, index, tensor.parameters, leased)
                if placement is not None:
                    if tensor.HasField("contents"):
                        raise InvalidArgument(
                            f"input {clip(tensor.name)!r} names a shared memory region and has typed contents too",
                            [(f"{placement.where}.contents", f"must not be set with {REGION}")],
                            reason=reasons.SHARED_MEMORY_PARAMETER_INVALID,
                        )
                    binding._inputs[tensor.name] = placement
            for index, output in enumerate(request.outputs):
                placement = self._placement("output", output.name, index, output.parameters, leased)
                if placement is not None:
                    binding._outputs[output.name] = placement
            yield binding
        finally:
            for region in leased:
                region.leases -= 1
                if not region.registered and not region.leases:
                    self._close(region)

    def _placement(
        self, kind: str, name: str, index: int, parameters: Mapping[str, pb.InferParameter], leased: list[_Region]
    ) -> _Placement | None:
        """Where the ``kind`` (input, output) ``name`` at ``index`` is, if its parameters name a region."""
        if not _names_region(parameters):
            return None
        check_name(f"{kind}s[{index}].name", name)
        where, label = f"{kind}s[{name}]", f"{kind} {clip(name)!r}"
        if REGION not in parameters:
            given = next(key for key in (BYTE_SIZE, OFFSET) if key in parameters)
            raise _parameter_error(where, label, given, f"{given} needs {REGION} beside it")
        region_parameter = parameters[REGION]
        if region_parameter.WhichOneof("parameter_choice") != "string_param":
            raise _parameter_error(where, label, REGION, f"{REGION} must be a string_param")
        region_name = region_parameter.string_param
        _check_region_name(f"{kind}s[{index}].parameters[{REGION}]", region_name)
        if BYTE_SIZE not in parameters:
            raise _parameter_error(where, label, BYTE_SIZE, f"{BYTE_SIZE} must be given with {REGION}")
        byte_size = _size_parameter(where, label, BYTE_SIZE, parameters[BYTE_SIZE])
        offset = _size_parameter(where, label, OFFSET, parameters[OFFSET]) if OFFSET in parameters else 0
        region = self._regions.get(region_name)
        if region is None:
            raise NotFound(
                f"{label} names shared memory region {clip(region_name)!r}, which is not registered",
                reason=reasons.SHARED_MEMORY_REGION_NOT_FOUND,
            )
        if offset > region.byte_size or byte_size > region.byte_size - offset:
            field_name = OFFSET if offset > region.byte_size else BYTE_SIZE
            raise InvalidArgument(
                f"{label}: offset {offset} + byte size {byte_size} is past the end of shared memory region "
                f"{clip(region_name)!r} ({region.byte_size} bytes)",
                [(f"{where}.parameters[{field_name}]", f"offset + byte size must be at most {region.byte_size}")],
                reason=reasons.SHARED_MEMORY_OUT_OF_RANGE,
            )
        region.leases += 1
        leased.append(region)
        return _Placement(region, offset, byte_size, where)

    # -- checks ------------------------------------------------------------------------------------------------

    def _check_caller(self, caller: Caller) -> None:
        if not self._policy.enabled:
            raise FailedPrecondition(
                "system shared memory is disabled on this server (INFERENCE_SHARED_MEMORY_ENABLED=false): send "
                "tensors in the request instead",
                reason=reasons.SHARED_MEMORY_DISABLED,
            )
        if caller.proxied:
            raise FailedPrecondition(NOT_LOCAL_MESSAGE, reason=reasons.SHARED_MEMORY_NOT_LOCAL)

    def _check_key(self, key: str) -> str:
        """The file name of ``key`` in the shared-memory directory, or INVALID_ARGUMENT."""
        filename = key.lstrip("/")
        if (
            not filename
            or "/" in filename
            or filename in (".", "..")
            or "\x00" in filename
            or len(filename.encode()) > _NAME_MAX
        ):
            raise InvalidArgument(
                f"key {clip(key)!r} is not the name of a shared memory object: one name of 1-{_NAME_MAX} bytes "
                "(after a leading '/'), without '/', not '.' or '..'",
                [("key", "must be a single name such as /my_region")],
                reason=reasons.SHARED_MEMORY_KEY_INVALID,
            )
        prefix = self._policy.key_prefix.lstrip("/")
        if not filename.startswith(prefix):
            raise InvalidArgument(
                f"key {clip(key)!r} does not start with {prefix!r}, the prefix this server allows "
                "(INFERENCE_SHARED_MEMORY_KEY_PREFIX)",
                [("key", f"must start with {prefix!r}")],
                reason=reasons.SHARED_MEMORY_KEY_NOT_ALLOWED,
            )
        if filename.startswith(self._policy.reserved_prefixes):
            raise InvalidArgument(
                f"key {clip(key)!r} names one of the inference service's own segments",
                [("key", f"must not start with {' or '.join(map(repr, self._policy.reserved_prefixes))}")],
                reason=reasons.SHARED_MEMORY_KEY_NOT_ALLOWED,
            )
        return filename

    def _open_object(self, filename: str, key: str) -> int:
        path = self._policy.directory / filename
        try:
            fd = os.open(path, _OPEN_FLAGS)
        except FileNotFoundError:
            raise NotFound(
                f"no shared memory object {clip(key)!r} ({self._policy.directory}/{clip(filename)}): create it first",
                reason=reasons.SHARED_MEMORY_OBJECT_NOT_FOUND,
            ) from None
        except OSError as error:
            raise _unusable(key, error.strerror or type(error).__name__) from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise _unusable(key, "not a regular file")
            if info.st_nlink != 1:
                raise _unusable(key, "it has other names (hard links)")
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _usage(self, client: str) -> tuple[int, int]:
        mine = [region for region in self._open if region.client == client]
        return len(mine), sum(region.byte_size for region in mine)

    def _close(self, region: _Region) -> None:
        region.close()
        self._open.discard(region)


def _check_region_name(field_name: str, name: str) -> None:
    if not name:
        raise InvalidArgument(
            "a shared memory region needs a name",
            [(field_name, "must not be empty")],
            reason=reasons.SHARED_MEMORY_NAME_REQUIRED,
        )
    check_name(field_name, name)


def _parameter_error(where: str, label: str, parameter: str, problem: str) -> InvalidArgument:
    return InvalidArgument(
        f"{label}: {problem}",
        [(f"{where}.parameters[{parameter}]", problem)],
        reason=reasons.SHARED_MEMORY_PARAMETER_INVALID,
    )


def _size_parameter(where: str, label: str, parameter: str, value: pb.InferParameter) -> int:
    choice = value.WhichOneof("parameter_choice")
    if choice not in ("int64_param", "uint64_param"):
        raise _parameter_error(where, label, parameter, f"{parameter} must be an int64_param")
    number = int(getattr(value, choice))
    if number < 0:
        raise _parameter_error(where, label, parameter, f"{parameter} must not be negative")
    return number


def _unusable(key: str, why: str) -> FailedPrecondition:
    return FailedPrecondition(
        f"the service cannot use shared memory object {clip(key)!r} as a region: {why}",
        reason=reasons.SHARED_MEMORY_OBJECT_UNUSABLE,
    )


# -- CUDA shared memory: answered as a Triton server without GPUs answers ------------------------------------


def cuda_status(name: str) -> None:
    """CudaSharedMemoryStatus: no regions; NOT_FOUND for a name (there are none)."""
    check_name("name", name)
    if name:
        raise NotFound(
            f"no CUDA shared memory region {clip(name)!r} is registered (this server has no GPUs)",
            reason=reasons.SHARED_MEMORY_REGION_NOT_FOUND,
        )


def cuda_register(name: str) -> None:
    """CudaSharedMemoryRegister: always INVALID_ARGUMENT."""
    check_name("name", name)
    raise InvalidArgument(
        f"CUDA shared memory is not supported on this server (no GPUs): cannot register {clip(name)!r}",
        [("name", "CUDA shared memory is not supported; use system shared memory")],
        reason=reasons.CUDA_SHARED_MEMORY_UNSUPPORTED,
    )


__all__ = [
    "BYTE_SIZE",
    "EXTENSION",
    "NOT_LOCAL_MESSAGE",
    "OFFSET",
    "PARAMETERS",
    "REGION",
    "SERVICE_SEGMENT_PREFIX",
    "SHM_DIR",
    "Binding",
    "Caller",
    "RegionStatus",
    "SharedMemoryPolicy",
    "SharedMemoryRegistry",
    "cuda_register",
    "cuda_status",
    "in_use",
]
