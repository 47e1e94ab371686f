"""The worker's end of its pipes: :class:`BlockingChannel`, blocking reads and thread-safe sends (the worker
answers pings from a reader thread while a model runs)."""

from __future__ import annotations

import os
import threading
from types import TracebackType

from services.inference.ipc import shm
from services.inference.ipc.errors import FrameTooLargeError, ProtocolError
from services.inference.ipc.messages import (
    DEFAULT_MAX_FRAME_BYTES,
    DEFAULT_SHM_THRESHOLD,
    HEADER,
    Message,
    decode,
    encode_frame,
)

_READ_BUFFER = 64 * 1024


class BlockingChannel:
    """Both pipe ends of a worker, with blocking reads and thread-safe sends. Owns (and closes) them.

    ``shm_threshold`` and ``shm_prefix`` are the defaults of :meth:`send` (no prefix: all inline);
    with ``shm_prefix``, :meth:`read` refuses segments outside it too. ``arena`` (with a prefix): the
    tensors this end sends go through one reusable arena (tag ``out``, ``arena_bytes`` to ``arena_max_bytes``), and the
    tensors read from the peer's arena are writable copies (see :mod:`services.inference.ipc.shm`);
    only one thread may send tensors then.
    """

    def __init__(
        self,
        read_fd: int,
        write_fd: int,
        *,
        shm_threshold: int = DEFAULT_SHM_THRESHOLD,
        shm_prefix: str = "",
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        arena: bool = False,
        arena_bytes: int = 0,
        arena_max_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        self._arena = shm.Arena(shm_prefix, "out", arena_bytes, arena_max_bytes) if arena and shm_prefix else None
        self._peer_arena = shm.ArenaReader(shm_prefix or None, writable=True) if arena and shm_prefix else None
        self._reader = open(read_fd, "rb", buffering=_READ_BUFFER)  # noqa: SIM115  (closed by close())
        self._write_fd = write_fd
        self._shm_threshold = shm_threshold
        self._shm_prefix = shm_prefix
        self._max_frame_bytes = max_frame_bytes
        self._read_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._broken: ProtocolError | None = None

    def read_payload(self) -> bytes:
        """The next frame without its length prefix; blocks. EOFError at the end of the pipe."""
        with self._read_lock:
            if self._broken is not None:
                raise ProtocolError("the pipe is out of step after an earlier error") from self._broken
            header = self._reader.read(HEADER.size)
            if len(header) < HEADER.size:
                raise EOFError("the pipe closed inside a frame" if header else "the peer closed the pipe")
            (length,) = HEADER.unpack(header)
            if length > self._max_frame_bytes:
                self._broken = FrameTooLargeError(
                    f"a frame of {length} bytes exceeds the limit of {self._max_frame_bytes}"
                )
                raise self._broken
            payload = self._reader.read(length)
            if len(payload) < length:
                raise EOFError("the pipe closed inside a frame")
            return payload

    def read(self) -> Message:
        """The next message; blocks. EOFError at the end of the pipe, ProtocolError on a malformed frame."""
        return self.decode(self.read_payload())

    def decode(self, payload: bytes) -> Message:
        """The message in a frame from :meth:`read_payload` (with this channel's segment prefix)."""
        return decode(payload, shm_prefix=self._shm_prefix or None, arena=self._peer_arena)

    def send(self, message: Message, *, shm_threshold: int | None = None, shm_prefix: str | None = None) -> None:
        """Encode and write one message; safe to call from several threads. OSError if the pipe broke."""
        threshold = self._shm_threshold if shm_threshold is None else shm_threshold
        prefix = self._shm_prefix if shm_prefix is None else shm_prefix
        arena = self._arena if prefix == self._shm_prefix else None
        frame, segments = encode_frame(message, threshold, prefix, arena)
        try:
            self.send_frame(frame)
        except BaseException:
            shm.unlink_segments(segments)
            raise

    def send_frame(self, frame: bytes) -> None:
        """Write one whole frame (from :func:`encode`); safe to call from several threads."""
        with self._write_lock:
            shm.write_all(self._write_fd, frame)

    def close(self) -> None:
        with self._write_lock:
            if self._write_fd >= 0:
                os.close(self._write_fd)
                self._write_fd = -1
        self._reader.close()
        if self._arena is not None:
            self._arena.close()
        if self._peer_arena is not None:
            self._peer_arena.close()

    def __enter__(self) -> BlockingChannel:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()
