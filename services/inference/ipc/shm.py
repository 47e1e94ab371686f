"""Shared memory for tensors: segments of their own, and each sender's reusable arena.

Segments of their own (:func:`write_segment`): the *sender* creates ``/dev/shm/<prefix><random>``
with ``O_CREAT | O_EXCL`` and mode 0600, writes it in full and closes it before the frame names it,
and never touches it again. The *receiver* opens it, unlinks it at once and maps it copy-on-write
(:func:`map_segment`): a decoded array is a zero-copy, writable view that lives as long as it does.

Arenas (:class:`Arena`, :class:`ArenaReader`): one reusable segment per sender and direction, at most
``maximum_bytes`` (a message needing more goes through segments of its own),
``/dev/shm/<prefix><tag>-<generation>``, created by the sender the first time a message needs it,
allocated in full at once (``posix_fallocate``: a full tmpfs is an error there, never a SIGBUS on a
later write), mapped by the sender for as long as it lives and written in place; a message that
needs more room moves to a new, larger generation and the old one is unlinked. Tensors sit at
page-aligned offsets. The receiver keeps the current generation open and never removes it. Reuse is
safe because each direction carries one message with tensors at a time (the supervisor sends a
worker its next call only after the answer to the previous one) and because the receiver copies each
tensor out of the arena as it decodes the frame (:class:`ArenaReader`): nothing it hands on refers
to the arena, so a model may keep or write its inputs, and the supervisor may hold an answer while the
worker already writes the next one.

Both kinds live under the sender's prefix, so :func:`sweep_segments` removes whatever a dead peer
left, arenas included. An empty prefix, or no /dev/shm (or a full one), sends tensors inline.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import re
import secrets
import stat
from collections.abc import Iterable
from typing import Final

from inference.v1 import worker_ipc_pb2 as pb

from services.common.logs import fields
from services.inference.ipc.errors import ProtocolError

log = logging.getLogger(__name__)

SHM_DIR: Final = "/dev/shm"  # noqa: S108  (a tmpfs for shared memory, not a temporary directory)
SERVICE_PREFIX: Final = "mlp-"
"""Every segment and arena of the inference service starts with this (then the supervisor's pid)."""
PAGE: Final = mmap.ALLOCATIONGRANULARITY
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
_SEGMENT_TRIES = 8
_shm_warned = False


def shm_path(name: str) -> str:
    """Where the segment ``name`` lives (under :data:`SHM_DIR`, read at each call: tests move it)."""
    return os.path.join(SHM_DIR, name)


def aligned(size: int) -> int:
    """``size`` rounded up to a whole number of pages."""
    return -(-size // PAGE) * PAGE


def write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def warn_no_shm(error: OSError) -> None:
    global _shm_warned
    if not _shm_warned:
        _shm_warned = True
        log.warning("ipc.shm_unavailable", extra=fields(directory=SHM_DIR, error=error.strerror or str(error)))


def _create(prefix: str, tag: str = "") -> tuple[str, int]:
    """A new segment file under ``prefix`` (name, write descriptor)."""
    for _ in range(_SEGMENT_TRIES):
        name = f"{prefix}{tag}{secrets.token_hex(8)}"
        try:
            fd = os.open(shm_path(name), os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            continue
        return name, fd
    raise FileExistsError(f"no free segment name under {prefix!r} after {_SEGMENT_TRIES} tries")


def write_segment(prefix: str, data: bytes | memoryview) -> str | None:
    """Name of a new segment holding ``data``; None if shared memory is unavailable."""
    try:
        name, fd = _create(prefix)
    except FileExistsError:
        raise
    except OSError as error:
        warn_no_shm(error)
        return None
    try:
        write_all(fd, data)
    except OSError as error:  # e.g. ENOSPC: /dev/shm is full
        unlink_segments([name])
        warn_no_shm(error)
        return None
    finally:
        os.close(fd)
    return name


def is_own_segment(name: str, prefix: str | None) -> bool:
    return _NAME.fullmatch(name) is not None and (prefix is None or name.startswith(prefix))


def check_name(prefix: str, what: str) -> None:
    if _NAME.fullmatch(prefix) is None:
        raise ValueError(f"{what} must be 1-200 characters of A-Z a-z 0-9 . _ - (not starting with . _ -)")


def _open_segment(ref: pb.WorkerFrame.SharedMemoryRef, prefix: str | None) -> int:
    """A read-only descriptor of the segment, whose name is already unlinked."""
    if not is_own_segment(ref.name, prefix):
        raise ProtocolError(f"segment name {ref.name!r} is not a segment under {prefix!r}")
    path = shm_path(ref.name)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as error:
        raise ProtocolError(f"segment {ref.name!r} cannot be opened: {error.strerror}") from None
    try:
        os.unlink(path)
        status = os.fstat(fd)
        if not stat.S_ISREG(status.st_mode) or status.st_size != ref.size or ref.size == 0:
            raise ProtocolError(f"segment {ref.name!r} is not a file of {ref.size} bytes")
    except BaseException:
        os.close(fd)
        raise
    return fd


def map_segment(ref: pb.WorkerFrame.SharedMemoryRef, prefix: str | None) -> mmap.mmap:
    fd = _open_segment(ref, prefix)
    try:
        return mmap.mmap(fd, ref.size, access=mmap.ACCESS_COPY)
    finally:
        os.close(fd)


def read_segment(ref: pb.WorkerFrame.SharedMemoryRef, prefix: str | None) -> bytes:
    with map_segment(ref, prefix) as mapping:
        return mapping[:]


def unlink_segments(names: Iterable[str]) -> None:
    for name in names:
        with contextlib.suppress(OSError):
            os.unlink(shm_path(name))


def sweep_segments(prefix: str) -> int:
    """Remove every segment under ``prefix`` (left by a worker that died); how many were removed."""
    check_name(prefix, "prefix")
    removed = 0
    try:
        with os.scandir(SHM_DIR) as entries:
            names = [entry.name for entry in entries if entry.name.startswith(prefix)]
    except OSError:
        return 0
    for name in names:
        with contextlib.suppress(OSError):
            os.unlink(shm_path(name))
            removed += 1
    return removed


class Arena:
    """A sender's reusable segment for one direction (see the module docstring). Not thread-safe:
    one sender, one message with tensors at a time."""

    def __init__(self, prefix: str, tag: str, minimum_bytes: int = 0, maximum_bytes: int = 64 * 1024 * 1024) -> None:
        check_name(prefix, "shm_prefix")
        self._prefix = prefix
        self._tag = tag
        self._minimum = aligned(max(0, minimum_bytes))
        self._maximum = max(0, maximum_bytes)
        self._name = ""
        self._size = 0
        self._mapping: mmap.mmap | None = None

    @property
    def name(self) -> str:
        return self._name

    @property
    def size(self) -> int:
        return self._size

    def reserve(self, size: int) -> bool:
        """Room for ``size`` bytes from offset 0; False if that is more than the arena may hold or shared
        memory cannot give it (the message then goes through segments of its own, or inline)."""
        if size <= self._size and self._mapping is not None:
            return True
        if size > self._maximum:
            return False
        wanted = min(max(aligned(size), self._minimum, 2 * self._size), max(aligned(size), self._maximum))
        try:
            name, fd = _create(self._prefix, f"{self._tag}-")
        except OSError as error:
            warn_no_shm(error)
            return False
        try:
            os.posix_fallocate(fd, 0, wanted)  # every page now: a full tmpfs fails here, not on a write
            mapping = mmap.mmap(fd, wanted, access=mmap.ACCESS_WRITE)
        except OSError as error:
            unlink_segments([name])
            warn_no_shm(error)
            return False
        finally:
            os.close(fd)
        self.close()
        self._name, self._size, self._mapping = name, wanted, mapping
        return True

    def write(self, offset: int, data: bytes | memoryview) -> None:
        """Copy ``data`` to ``offset`` (within what :meth:`reserve` granted)."""
        if self._mapping is None:
            raise ValueError("the arena has no segment: reserve first")
        view = memoryview(data).cast("B")
        self._mapping[offset : offset + len(view)] = view

    def close(self) -> None:
        """Unmap and remove the current segment (the receiver's open mapping, if any, stays valid)."""
        if self._mapping is not None:
            self._mapping.close()
            self._mapping = None
        if self._name:
            unlink_segments([self._name])
            self._name, self._size = "", 0


class ArenaReader:
    """A receiver's view of its peer's arena: the current generation kept mapped (read-only), and each
    tensor copied out of it as it is decoded, so that nothing refers to the arena once the peer reuses it.

    ``writable=False`` (the supervisor): the copy is ``bytes`` (what a response message takes as it is);
    ``writable=True`` (the worker): a ``bytearray``, so that a model may write to its inputs. One copy
    either way, cheaper than mapping the tensor's pages privately (6.7 ms against 0.6-1.2 ms at 8 MiB here).
    """

    def __init__(self, prefix: str | None, *, writable: bool = False) -> None:
        self._prefix = prefix
        self._writable = writable
        self._name = ""
        self._size = 0
        self._mapping: mmap.mmap | None = None
        self._view: memoryview | None = None

    def _open(self, ref: pb.WorkerFrame.SharedMemoryRef) -> memoryview:
        if ref.name == self._name and self._view is not None:
            return self._view
        if not is_own_segment(ref.name, self._prefix):
            raise ProtocolError(f"arena name {ref.name!r} is not a segment under {self._prefix!r}")
        try:
            fd = os.open(shm_path(ref.name), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as error:
            raise ProtocolError(f"arena {ref.name!r} cannot be opened: {error.strerror}") from None
        try:
            status = os.fstat(fd)
            if not stat.S_ISREG(status.st_mode) or status.st_size == 0:
                raise ProtocolError(f"arena {ref.name!r} is not a file")
            mapping = mmap.mmap(fd, status.st_size, access=mmap.ACCESS_READ)
        finally:
            os.close(fd)
        self.close()
        self._name, self._size, self._mapping = ref.name, status.st_size, mapping
        self._view = memoryview(mapping)
        return self._view

    def read(self, ref: pb.WorkerFrame.SharedMemoryRef) -> bytes | bytearray:
        """A copy of the ``ref.size`` bytes at ``ref.offset`` of the peer's arena (see the class docstring)."""
        view = self._open(ref)
        if ref.offset % PAGE or ref.offset + ref.size > self._size:
            raise ProtocolError(f"arena {ref.name!r}: {ref.size} bytes at {ref.offset} do not fit {self._size}")
        part = view[ref.offset : ref.offset + ref.size]
        try:
            return bytearray(part) if self._writable else bytes(part)
        finally:
            part.release()

    def close(self) -> None:
        if self._view is not None:
            self._view.release()
            self._view = None
        if self._mapping is not None:
            self._mapping.close()
            self._mapping = None
        self._name, self._size = "", 0
