"""Messages between the inference supervisor and its worker processes, and the pipes they travel on.

Frame format
    A pipe carries frames back to back. A frame is a 4-byte little-endian unsigned length ``N``,
    then ``N`` bytes: one serialized ``inference.v1.WorkerFrame`` (protos/inference/v1/worker_ipc.proto).
    A reader refuses a length above its ``max_frame_bytes``: the pipe is then out of step for good.
    End of file between frames is a clean end; inside a frame, the peer died while writing.

Tensors
    ``dtype`` is a numpy dtype string for numbers and booleans (``"<f4"``, ``"|b1"``, ``">i8"``; byte
    order as sent) and the elements are the array's bytes in row-major order. ``"bytes"`` is an object
    array of ``bytes``: each element as a 4-byte little-endian length then its bytes, concatenated.
    Other dtypes (str, datetime, structured, object arrays of anything else) are refused.

Shared memory: who creates, who removes (:mod:`.shm` has the details)
    * Between the supervisor and a worker, each sender has one reusable *arena* per worker
      (:class:`Arena`): a segment created once under the worker's prefix, allocated in full, grown
      on demand and removed when the worker stops; tensors of at least ``shm_threshold`` bytes are
      written into it at page-aligned offsets, one message with tensors at a time each way, and
      the frame names the arena, the offset and the size. The receiver never removes an arena.
    * Otherwise (``encode`` without an arena) a tensor whose serialized size is at least
      ``shm_threshold`` (and not 0) goes into a segment of its own: a file ``/dev/shm/<shm_prefix><random>`` that the *sender* creates with
      ``O_CREAT | O_EXCL`` and mode 0600, writes in full and closes before the frame names it.
      The sender never touches it again.
    * Once the frame is written, the segment belongs to the *receiver*. :func:`decode` opens it,
      unlinks it at once, and maps it copy-on-write: the decoded array is a zero-copy, writable view
      of the mapping, which lives exactly as long as the array (and any view of it) does. No name is
      left in /dev/shm after a decode, successful or not (a reader given a prefix leaves names
      outside it alone: they are not its segments).
    * A segment whose frame is never decoded (the peer died, the write failed, the frame was dropped)
      stays under its prefix. Both directions of one worker use the same prefix (e.g.
      ``mlp-<supervisor pid>-<worker id>-``), so the supervisor calls :func:`sweep_segments` with it
      once the worker has exited. End prefixes with a separator so that none is a prefix of another.
    * An empty prefix, or no /dev/shm (or a full one), sends every tensor inline instead.
    A decoded array holds its tmpfs pages until it is garbage-collected: keep large results short-lived.

Errors
    ValueError
     +-- ProtocolError         a malformed frame (decode, read): a buggy or hostile peer; replace it
          +-- FrameTooLargeError   a length prefix above ``max_frame_bytes``; the pipe is out of step
    EOFError                   the peer closed its end (read), possibly in the middle of a frame
    BrokenPipeError            the peer is gone (write, drain, send)
    ``encode`` raises ValueError for a tensor it cannot send (dtype, size) and then leaves no segment behind.

Modules: :mod:`.messages` (the messages, :func:`encode`, :func:`decode`), :mod:`.shm` (segments and
arenas), :mod:`.aio` (the supervisor's side on asyncio: :func:`open_pipes` gives a :class:`FrameReader`
and a :class:`FrameWriter`), :mod:`.blocking` (the worker's side: :class:`BlockingChannel`, whose
:meth:`~BlockingChannel.send` may be called from several threads at once: the worker answers pings from
a reader thread while a model runs). This package re-exports what the rest of the service uses.
"""

from services.inference.ipc.aio import FrameReader, FrameWriter, open_pipes
from services.inference.ipc.blocking import BlockingChannel
from services.inference.ipc.errors import FrameTooLargeError, ProtocolError
from services.inference.ipc.messages import (
    BYTES_DTYPE,
    DEFAULT_MAX_FRAME_BYTES,
    DEFAULT_SHM_THRESHOLD,
    STATUS_CODES,
    Failure,
    InferCall,
    InferResult,
    LoadFailed,
    Message,
    Ping,
    Pong,
    Ready,
    Shutdown,
    decode,
    encode,
)
from services.inference.ipc.shm import SERVICE_PREFIX, SHM_DIR, Arena, ArenaReader, sweep_segments

__all__ = [
    "BYTES_DTYPE",
    "DEFAULT_MAX_FRAME_BYTES",
    "DEFAULT_SHM_THRESHOLD",
    "SERVICE_PREFIX",
    "SHM_DIR",
    "STATUS_CODES",
    "Arena",
    "ArenaReader",
    "BlockingChannel",
    "Failure",
    "FrameReader",
    "FrameTooLargeError",
    "FrameWriter",
    "InferCall",
    "InferResult",
    "LoadFailed",
    "Message",
    "Ping",
    "Pong",
    "ProtocolError",
    "Ready",
    "Shutdown",
    "decode",
    "encode",
    "open_pipes",
    "sweep_segments",
]
