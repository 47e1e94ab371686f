"""The supervisor's end of a worker's pipes, on asyncio: :func:`open_pipes` gives a :class:`FrameReader`
and a :class:`FrameWriter`."""

from __future__ import annotations

import asyncio
import io
from typing import Literal

from services.inference.ipc import shm
from services.inference.ipc.errors import FrameTooLargeError, ProtocolError
from services.inference.ipc.messages import DEFAULT_MAX_FRAME_BYTES, HEADER, Message, decode

_STREAM_LIMIT = 1024 * 1024


class _WriteProtocol(asyncio.BaseProtocol):
    """Flow control of a write pipe: ``drain`` waits while the transport's buffer is full."""

    def __init__(self) -> None:
        self._writable = asyncio.Event()
        self._writable.set()
        self.lost: BaseException | None = None

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = exc or BrokenPipeError("the pipe to the peer is closed")
        self._writable.set()

    async def drain(self) -> None:
        await self._writable.wait()
        if self.lost is not None:
            raise BrokenPipeError("the pipe to the peer is closed") from self.lost


class FrameReader:
    """Reads frames from a pipe on the event loop."""

    def __init__(
        self,
        stream: asyncio.StreamReader,
        transport: asyncio.ReadTransport,
        *,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        shm_prefix: str | None = None,
    ) -> None:
        self._stream = stream
        self._transport = transport
        self._max_frame_bytes = max_frame_bytes
        self._shm_prefix = shm_prefix
        self._arena = shm.ArenaReader(shm_prefix)  # the answers' tensors, copied out at once
        self._broken: ProtocolError | None = None

    async def read_payload(self) -> bytes:
        """The next frame without its length prefix. EOFError at the end of the pipe."""
        if self._broken is not None:
            raise ProtocolError("the pipe is out of step after an earlier error") from self._broken
        try:
            header = await self._stream.readexactly(HEADER.size)
        except asyncio.IncompleteReadError as error:
            raise EOFError("the pipe closed inside a frame" if error.partial else "the peer closed the pipe") from None
        (length,) = HEADER.unpack(header)
        if length > self._max_frame_bytes:
            self._broken = FrameTooLargeError(f"a frame of {length} bytes exceeds the limit of {self._max_frame_bytes}")
            raise self._broken
        try:
            return await self._stream.readexactly(length)
        except asyncio.IncompleteReadError:
            raise EOFError("the pipe closed inside a frame") from None

    async def read(self) -> Message:
        """The next message. EOFError at the end of the pipe, ProtocolError on a malformed frame."""
        return decode(await self.read_payload(), shm_prefix=self._shm_prefix, arena=self._arena)

    def close(self) -> None:
        self._transport.close()
        self._arena.close()


class FrameWriter:
    """Writes frames to a pipe on the event loop: ``write`` whole frames, then ``await drain()``."""

    def __init__(self, transport: asyncio.WriteTransport, protocol: _WriteProtocol) -> None:
        self._transport = transport
        self._protocol = protocol

    def write(self, frame: bytes) -> None:
        """Queue one whole frame (from :func:`encode`). BrokenPipeError if the pipe is closed."""
        if self._protocol.lost is not None or self._transport.is_closing():
            raise BrokenPipeError("the pipe to the peer is closed")
        self._transport.write(frame)

    async def drain(self) -> None:
        """Wait until the pipe has room again. BrokenPipeError if the peer is gone."""
        await self._protocol.drain()

    def close(self) -> None:
        """Close the pipe once what is queued has been written."""
        self._transport.close()


def _pipe_file(fd: int, mode: Literal["r", "w"]) -> io.FileIO:
    """An unbuffered file object owning ``fd`` (a pipe end: opening it does not block)."""
    return io.FileIO(fd, mode)


async def open_pipes(
    read_fd: int, write_fd: int, *, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES, shm_prefix: str | None = None
) -> tuple[FrameReader, FrameWriter]:
    """Reader and writer over two pipe ends, which they own (and close) from now on.
    With ``shm_prefix``, the reader refuses segments outside it."""
    loop = asyncio.get_running_loop()
    read_pipe, write_pipe = _pipe_file(read_fd, "r"), _pipe_file(write_fd, "w")
    stream = asyncio.StreamReader(limit=_STREAM_LIMIT, loop=loop)
    try:
        read_transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stream), read_pipe)
    except BaseException:
        read_pipe.close()
        write_pipe.close()
        raise
    try:
        write_transport, protocol = await loop.connect_write_pipe(_WriteProtocol, write_pipe)
    except BaseException:
        read_transport.close()
        write_pipe.close()
        raise
    reader = FrameReader(stream, read_transport, max_frame_bytes=max_frame_bytes, shm_prefix=shm_prefix)
    return reader, FrameWriter(write_transport, protocol)
