"""The errors of the worker protocol."""

from __future__ import annotations


class ProtocolError(ValueError):
    """A frame that does not follow the protocol; the pipe cannot be trusted any more."""


class FrameTooLargeError(ProtocolError):
    """A length prefix above the reader's ``max_frame_bytes``."""
