"""What the inference service's errors say: ErrorInfo reasons, and bounds on the client text they echo.

Every INVALID_ARGUMENT and RESOURCE_EXHAUSTED the service raises for a request names its cause in
``google.rpc.ErrorInfo.reason`` with one of the constants below (:data:`ALL` lists them), so a
client can tell a shape mismatch from a datatype mismatch without parsing the message.

Client strings are never copied into a message unbounded: names longer than
:data:`MAX_NAME_CHARS` are refused (:func:`check_name`, reason ``NAME_TOO_LONG``, without echoing
the name), and any other client text in a message goes through :func:`clip`. The message travels
twice in the trailers (``grpc-message`` and ``grpc-status-details-bin``), which a client's default
metadata limit (8 KiB in gRPC) has to hold.
"""

from __future__ import annotations

from services.common.errors import InvalidArgument

# --- INVALID_ARGUMENT -------------------------------------------------------------------------------
MODEL_NAME_REQUIRED = "MODEL_NAME_REQUIRED"
"""``model_name`` is empty (or a version is given without a model name)."""
NAME_TOO_LONG = "NAME_TOO_LONG"
"""A model, version, input, output or parameter name is longer than :data:`MAX_NAME_CHARS`."""
UNKNOWN_INPUT = "UNKNOWN_INPUT"
"""An input the model does not declare."""
DUPLICATE_INPUT = "DUPLICATE_INPUT"
"""The same input twice in one request."""
MISSING_INPUT = "MISSING_INPUT"
"""A declared input the request does not carry."""
DATATYPE_MISMATCH = "DATATYPE_MISMATCH"
"""An input's datatype is not the declared one."""
SHAPE_MISMATCH = "SHAPE_MISMATCH"
"""An input's rank or a fixed dimension differs from the declared shape."""
NEGATIVE_DIMENSION = "NEGATIVE_DIMENSION"
"""A dimension below zero."""
SHAPE_OVERFLOW = "SHAPE_OVERFLOW"
"""The element count of a shape does not fit in 63 bits."""
ZERO_SIZE_DIMENSION = "ZERO_SIZE_DIMENSION"
"""A dimension of 0 (an empty tensor) to a model that does not allow them (``parameters.allow_zero_size``)."""
BATCH_SIZE_MISMATCH = "BATCH_SIZE_MISMATCH"
"""The inputs of a batching model differ in their first dimension."""
BATCH_TOO_LARGE = "BATCH_TOO_LARGE"
"""The batch (first dimension) is larger than the model's ``max_batch_size``."""
MISSING_DATA = "MISSING_DATA"
"""An input with elements but neither typed contents nor a ``raw_input_contents`` entry."""
RAW_AND_TYPED_CONTENTS = "RAW_AND_TYPED_CONTENTS"
"""An input with typed contents and a ``raw_input_contents`` entry as well."""
RAW_COUNT_MISMATCH = "RAW_COUNT_MISMATCH"
"""More ``raw_input_contents`` entries than inputs without typed contents."""
RAW_SIZE_MISMATCH = "RAW_SIZE_MISMATCH"
"""A raw entry whose length does not fit the shape and datatype (BYTES: a broken length prefix)."""
CONTENTS_FIELD_MISMATCH = "CONTENTS_FIELD_MISMATCH"
"""Typed contents in a field other than the datatype's (or FP16/BF16, which travel raw only)."""
CONTENTS_SIZE_MISMATCH = "CONTENTS_SIZE_MISMATCH"
"""Typed contents with more or fewer values than the shape has elements."""
VALUE_OUT_OF_RANGE = "VALUE_OUT_OF_RANGE"
"""A typed value outside its datatype's range, or a raw BOOL byte other than 0 and 1."""
NON_FINITE_INPUT = "NON_FINITE_INPUT"
"""NaN or infinity in a floating-point input of a model that does not take them (sklearn and onnx by default)."""
MODEL_REJECTED_INPUT = "MODEL_REJECTED_INPUT"
"""A python model raised ``services.inference.runtimes.InvalidInput``."""
UNKNOWN_OUTPUT = "UNKNOWN_OUTPUT"
"""A requested output the model does not declare."""
DUPLICATE_OUTPUT = "DUPLICATE_OUTPUT"
"""The same output requested twice."""
INVALID_PARAMETER = "INVALID_PARAMETER"
"""A request parameter the service reads has the wrong type (``raw_output`` must be a bool_param)."""
WORKER_ID_REQUIRED = "WORKER_ID_REQUIRED"
"""RestartWorker: ``worker_id`` is empty."""
SHARED_MEMORY_NAME_REQUIRED = "SHARED_MEMORY_NAME_REQUIRED"
"""A shared memory region without a name (SystemSharedMemoryRegister, or a tensor's ``shared_memory_region``)."""
SHARED_MEMORY_KEY_INVALID = "SHARED_MEMORY_KEY_INVALID"
"""A key that is not one name in /dev/shm: empty, with a ``/`` after the leading one, ``.``, ``..``, over 255 bytes."""
SHARED_MEMORY_KEY_NOT_ALLOWED = "SHARED_MEMORY_KEY_NOT_ALLOWED"
"""A key outside ``INFERENCE_SHARED_MEMORY_KEY_PREFIX``, or one that names the service's own segments (``mlp-``)."""
SHARED_MEMORY_OUT_OF_RANGE = "SHARED_MEMORY_OUT_OF_RANGE"
"""Offset + byte size past the end of the object (register) or of the region (a tensor); a region of 0 bytes."""
SHARED_MEMORY_PARAMETER_INVALID = "SHARED_MEMORY_PARAMETER_INVALID"
"""A tensor's ``shared_memory_*`` parameters: a wrong type, a negative size, one without the others, or contents too."""
SHARED_MEMORY_SIZE_MISMATCH = "SHARED_MEMORY_SIZE_MISMATCH"
"""An input's ``shared_memory_byte_size`` is not what its shape and datatype take."""
SHARED_MEMORY_OUTPUT_TOO_LARGE = "SHARED_MEMORY_OUTPUT_TOO_LARGE"
"""An output takes more bytes than the ``shared_memory_byte_size`` given for it."""
CUDA_SHARED_MEMORY_UNSUPPORTED = "CUDA_SHARED_MEMORY_UNSUPPORTED"
"""CudaSharedMemoryRegister: the server has no GPUs (as a Triton server without GPUs answers)."""

# --- NOT_FOUND ------------------------------------------------------------------------------------------
MODEL_NOT_FOUND = "MODEL_NOT_FOUND"
"""No such model in the repository, or it is not loaded (served)."""
VERSION_NOT_FOUND = "VERSION_NOT_FOUND"
"""The model is served, but not in the version asked for."""
WORKER_NOT_FOUND = "WORKER_NOT_FOUND"
"""RestartWorker: no worker has that ``worker_id``."""
SHARED_MEMORY_REGION_NOT_FOUND = "SHARED_MEMORY_REGION_NOT_FOUND"
"""A status request or a tensor names a shared memory region that is not registered."""
SHARED_MEMORY_OBJECT_NOT_FOUND = "SHARED_MEMORY_OBJECT_NOT_FOUND"
"""SystemSharedMemoryRegister: no shared memory object /dev/shm/<key>."""

# --- ALREADY_EXISTS -------------------------------------------------------------------------------------
SHARED_MEMORY_REGION_EXISTS = "SHARED_MEMORY_REGION_EXISTS"
"""SystemSharedMemoryRegister: a region of that name is registered already."""

# --- FAILED_PRECONDITION --------------------------------------------------------------------------------
SHARED_MEMORY_DISABLED = "SHARED_MEMORY_DISABLED"
"""A system shared memory call, or a tensor in a region, while ``INFERENCE_SHARED_MEMORY_ENABLED`` is false."""
SHARED_MEMORY_NOT_LOCAL = "SHARED_MEMORY_NOT_LOCAL"
"""Shared memory through a proxy (the call carries ``x-forwarded-for``, as the gateway's do)."""
SHARED_MEMORY_OBJECT_UNUSABLE = "SHARED_MEMORY_OBJECT_UNUSABLE"
"""The object cannot serve as a region: not openable read-write, a symlink or not a regular file, hard-linked, it
shrank below the registered region, or a read or write of it failed (a full /dev/shm)."""

# --- RESOURCE_EXHAUSTED (not worth a retry: the same request fails the same way) ---------------------
TOO_MANY_INPUT_ELEMENTS = "TOO_MANY_INPUT_ELEMENTS"
"""The inputs of a request have more elements together than ``INFERENCE_MAX_REQUEST_ELEMENTS``."""
TOO_MANY_OUTPUT_ELEMENTS = "TOO_MANY_OUTPUT_ELEMENTS"
"""The outputs would have more elements together than ``INFERENCE_MAX_OUTPUT_ELEMENTS``."""
OUTPUT_TOO_LARGE = "OUTPUT_TOO_LARGE"
"""The answer would not fit in ``INFERENCE_MAX_MESSAGE_BYTES``."""
MODEL_OUT_OF_MEMORY = "MODEL_OUT_OF_MEMORY"
"""The model ran out of memory on this request (MemoryError in the worker); smaller requests may succeed."""
SHARED_MEMORY_TOO_MANY_REGIONS = "SHARED_MEMORY_TOO_MANY_REGIONS"
"""The client holds ``INFERENCE_SHARED_MEMORY_MAX_REGIONS_PER_CLIENT`` regions already."""
SHARED_MEMORY_TOO_MANY_BYTES = "SHARED_MEMORY_TOO_MANY_BYTES"
"""The client's regions would span more than ``INFERENCE_SHARED_MEMORY_MAX_BYTES_PER_CLIENT`` bytes."""

ALL: tuple[str, ...] = (
    MODEL_NAME_REQUIRED,
    NAME_TOO_LONG,
    UNKNOWN_INPUT,
    DUPLICATE_INPUT,
    MISSING_INPUT,
    DATATYPE_MISMATCH,
    SHAPE_MISMATCH,
    NEGATIVE_DIMENSION,
    SHAPE_OVERFLOW,
    ZERO_SIZE_DIMENSION,
    BATCH_SIZE_MISMATCH,
    BATCH_TOO_LARGE,
    MISSING_DATA,
    RAW_AND_TYPED_CONTENTS,
    RAW_COUNT_MISMATCH,
    RAW_SIZE_MISMATCH,
    CONTENTS_FIELD_MISMATCH,
    CONTENTS_SIZE_MISMATCH,
    VALUE_OUT_OF_RANGE,
    NON_FINITE_INPUT,
    MODEL_REJECTED_INPUT,
    UNKNOWN_OUTPUT,
    DUPLICATE_OUTPUT,
    INVALID_PARAMETER,
    WORKER_ID_REQUIRED,
    SHARED_MEMORY_NAME_REQUIRED,
    SHARED_MEMORY_KEY_INVALID,
    SHARED_MEMORY_KEY_NOT_ALLOWED,
    SHARED_MEMORY_OUT_OF_RANGE,
    SHARED_MEMORY_PARAMETER_INVALID,
    SHARED_MEMORY_SIZE_MISMATCH,
    SHARED_MEMORY_OUTPUT_TOO_LARGE,
    CUDA_SHARED_MEMORY_UNSUPPORTED,
    MODEL_NOT_FOUND,
    VERSION_NOT_FOUND,
    WORKER_NOT_FOUND,
    SHARED_MEMORY_REGION_NOT_FOUND,
    SHARED_MEMORY_OBJECT_NOT_FOUND,
    SHARED_MEMORY_REGION_EXISTS,
    SHARED_MEMORY_DISABLED,
    SHARED_MEMORY_NOT_LOCAL,
    SHARED_MEMORY_OBJECT_UNUSABLE,
    TOO_MANY_INPUT_ELEMENTS,
    TOO_MANY_OUTPUT_ELEMENTS,
    OUTPUT_TOO_LARGE,
    MODEL_OUT_OF_MEMORY,
    SHARED_MEMORY_TOO_MANY_REGIONS,
    SHARED_MEMORY_TOO_MANY_BYTES,
)
"""Every reason above, INVALID_ARGUMENT ones first."""

# --- bounds on echoed client text -------------------------------------------------------------------
MAX_NAME_CHARS = 256
"""Longest model, version, input, output or parameter name a request may carry."""
ECHO_CHARS = 64
"""Longest piece of client text copied into an error message (:func:`clip`)."""
MAX_MODEL_MESSAGE_CHARS = 512
"""Longest message of a model's ``InvalidInput`` passed on to the client."""


def clip(text: str, limit: int = ECHO_CHARS) -> str:
    """``text`` if it has at most ``limit`` characters, else its first ``limit - 1`` and an ellipsis."""
    return text if len(text) <= limit else text[: max(0, limit - 1)] + "…"


def check_name(field: str, value: str) -> None:
    """Raise INVALID_ARGUMENT (``NAME_TOO_LONG``, naming ``field``, not echoing ``value``) for a long name."""
    if len(value) > MAX_NAME_CHARS:
        raise InvalidArgument(
            f"{field} is {len(value)} characters long; the limit is {MAX_NAME_CHARS}",
            [(field, f"must be at most {MAX_NAME_CHARS} characters")],
            reason=NAME_TOO_LONG,
        )


__all__ = [
    "ALL",
    "BATCH_SIZE_MISMATCH",
    "BATCH_TOO_LARGE",
    "CONTENTS_FIELD_MISMATCH",
    "CONTENTS_SIZE_MISMATCH",
    "CUDA_SHARED_MEMORY_UNSUPPORTED",
    "DATATYPE_MISMATCH",
    "DUPLICATE_INPUT",
    "DUPLICATE_OUTPUT",
    "ECHO_CHARS",
    "INVALID_PARAMETER",
    "MAX_MODEL_MESSAGE_CHARS",
    "MAX_NAME_CHARS",
    "MISSING_DATA",
    "MISSING_INPUT",
    "MODEL_NAME_REQUIRED",
    "MODEL_NOT_FOUND",
    "MODEL_OUT_OF_MEMORY",
    "MODEL_REJECTED_INPUT",
    "NAME_TOO_LONG",
    "NEGATIVE_DIMENSION",
    "NON_FINITE_INPUT",
    "OUTPUT_TOO_LARGE",
    "RAW_AND_TYPED_CONTENTS",
    "RAW_COUNT_MISMATCH",
    "RAW_SIZE_MISMATCH",
    "SHAPE_MISMATCH",
    "SHAPE_OVERFLOW",
    "SHARED_MEMORY_DISABLED",
    "SHARED_MEMORY_KEY_INVALID",
    "SHARED_MEMORY_KEY_NOT_ALLOWED",
    "SHARED_MEMORY_NAME_REQUIRED",
    "SHARED_MEMORY_NOT_LOCAL",
    "SHARED_MEMORY_OBJECT_NOT_FOUND",
    "SHARED_MEMORY_OBJECT_UNUSABLE",
    "SHARED_MEMORY_OUTPUT_TOO_LARGE",
    "SHARED_MEMORY_OUT_OF_RANGE",
    "SHARED_MEMORY_PARAMETER_INVALID",
    "SHARED_MEMORY_REGION_EXISTS",
    "SHARED_MEMORY_REGION_NOT_FOUND",
    "SHARED_MEMORY_SIZE_MISMATCH",
    "SHARED_MEMORY_TOO_MANY_BYTES",
    "SHARED_MEMORY_TOO_MANY_REGIONS",
    "TOO_MANY_INPUT_ELEMENTS",
    "TOO_MANY_OUTPUT_ELEMENTS",
    "UNKNOWN_INPUT",
    "UNKNOWN_OUTPUT",
    "VALUE_OUT_OF_RANGE",
    "VERSION_NOT_FOUND",
    "WORKER_ID_REQUIRED",
    "WORKER_NOT_FOUND",
    "ZERO_SIZE_DIMENSION",
    "check_name",
    "clip",
]
