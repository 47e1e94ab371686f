"""Helpers of the shared-memory tests: objects in /dev/shm made under a test's own prefix, what the server (it
runs in the test's process) holds of them, requests whose tensors name regions, and the tritonclient program."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from inference import grpc_service_pb2 as pb

from tests.conftest import REPO
from tests.inference.conftest import CLIENTS_PYTHON
from tests.rpc import details

SHM = Path("/dev/shm")  # noqa: S108  (POSIX shared memory, not a temporary directory)


def triton_shm(commands: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Run tests/clients/triton_shm.py (real tritonclient, its own venv and process) with ``commands``."""
    done = subprocess.run(
        [str(CLIENTS_PYTHON), str(REPO / "tests" / "clients" / "triton_shm.py")],
        input=json.dumps(commands),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={k: v for k, v in os.environ.items() if not k.startswith("PYTHON")},
    )
    assert done.returncode == 0, done.stderr
    answers: list[dict[str, Any]] = json.loads(done.stdout)
    return answers


class Objects:
    """Shared-memory objects made for one test under its own prefix, removed afterwards."""

    def __init__(self) -> None:
        self.prefix = f"shmtest-{secrets.token_hex(4)}-"

    def make(self, name: str, size: int, data: bytes = b"") -> str:
        path = SHM / f"{self.prefix}{name}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)
            if data:
                os.pwrite(fd, data, 0)
        finally:
            os.close(fd)
        return f"/{self.prefix}{name}"

    def path(self, key: str) -> Path:
        return SHM / key.lstrip("/")

    def files(self) -> list[str]:
        return sorted(entry.name for entry in SHM.iterdir() if entry.name.startswith(self.prefix))

    def cleanup(self) -> None:
        for name in self.files():
            path = SHM / name
            if path.is_dir() and not path.is_symlink():
                path.rmdir()
            else:
                path.unlink()


def service_segments() -> list[str]:
    return sorted(entry.name for entry in SHM.iterdir() if entry.name.startswith(f"mlp-{os.getpid()}-"))


def descriptors(prefix: str) -> list[str]:
    """The objects under ``prefix`` that this process (the server runs in it) holds open."""
    found = []
    for fd in Path("/proc/self/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue  # closed meanwhile (the listing's own descriptor)
        if target.startswith(f"{SHM}/{prefix}"):
            found.append(target)
    return found


def mappings(prefix: str) -> list[str]:
    """The lines of /proc/self/maps that map an object under ``prefix``."""
    return [line for line in Path("/proc/self/maps").read_text().splitlines() if f"{SHM}/{prefix}" in line]


def held(prefix: str) -> list[str]:
    return descriptors(prefix) + mappings(prefix)


def reason(error: grpc.aio.AioRpcError) -> str:
    return str(details(error)["ErrorInfo"].reason)


def register(name: str, key: str, byte_size: int, offset: int = 0) -> pb.SystemSharedMemoryRegisterRequest:
    return pb.SystemSharedMemoryRegisterRequest(name=name, key=key, offset=offset, byte_size=byte_size)


def in_region(tensor: Any, region: str, byte_size: int, offset: int | None = None) -> None:
    tensor.parameters["shared_memory_region"].string_param = region
    tensor.parameters["shared_memory_byte_size"].int64_param = byte_size
    if offset is not None:
        tensor.parameters["shared_memory_offset"].int64_param = offset


def simple_in_regions(region: str = "in", out: str | None = "out", rows: int = 1) -> pb.ModelInferRequest:
    """`simple` with INPUT0 at 0 and INPUT1 after it in ``region``; both outputs in ``out`` likewise (or raw)."""
    size = rows * 16 * 4
    request = pb.ModelInferRequest(model_name="simple")
    for index, name in enumerate(("INPUT0", "INPUT1")):
        tensor = request.inputs.add(name=name, datatype="INT32", shape=[rows, 16])
        in_region(tensor, region, size, index * size or None)
    for index, name in enumerate(("OUTPUT0", "OUTPUT1")):
        output = request.outputs.add(name=name)
        if out is not None:
            in_region(output, out, size, index * size or None)
    return request


def simple_inputs(rows: int = 1) -> tuple[np.ndarray, np.ndarray]:
    left = np.arange(rows * 16, dtype=np.int32).reshape(rows, 16) - 7
    return left, left * 3
