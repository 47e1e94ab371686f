"""Real service processes started through their entry points (``python -m services.<name>``)."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PREFIXES = {"auth": "AUTH_", "gateway": "GATEWAY_", "inference": "INFERENCE_"}


@dataclass
class ServiceProcess:
    name: str
    process: subprocess.Popen[str]
    port: int = 0
    metrics_port: int = 0
    lines: list[dict[str, Any]] = field(default_factory=list)
    raw: list[str] = field(default_factory=list)
    _queue: queue.Queue[str | None] = field(default_factory=queue.Queue)
    _pump_thread: threading.Thread | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _pump(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.raw.append(line)
            with contextlib.suppress(json.JSONDecodeError):
                self.lines.append(json.loads(line))
            self._queue.put(line)
        self._queue.put(None)

    def wait_for_event(self, event: str, timeout: float = 30.0) -> dict[str, Any]:
        """Poll the log until ``event`` appears (or the process ends, or the deadline passes)."""
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for line in self.lines[seen:]:
                if line.get("event") == event:
                    return line
            seen = len(self.lines)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{self.name}: no {event!r} within {timeout}s; log: {''.join(self.raw)[-2000:]}")
            try:
                if self._queue.get(timeout=remaining) is None:
                    if any(line.get("event") == event for line in self.lines):
                        continue
                    raise RuntimeError(f"{self.name} exited ({self.process.wait()}): {''.join(self.raw)[-2000:]}")
            except queue.Empty:
                continue

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM (if still running), wait, and release the log pipe."""
        if self.process.poll() is None:
            self.process.terminate()
        code = self.process.wait(timeout=timeout)
        if self._pump_thread is not None:
            self._pump_thread.join(timeout=timeout)
        if self.process.stderr is not None:
            self.process.stderr.close()
        return code


def start_service(name: str, workdir: Path, env_extra: dict[str, str] | None = None, **settings: str) -> ServiceProcess:
    """Start a service on free ports (port 0), its files under ``workdir``, and wait until it is ready.

    Ready: it has logged ``server.started`` (and, for inference, its readiness after loading models).
    """
    prefix = PREFIXES[name]
    env = {key: value for key, value in os.environ.items() if not key.startswith(tuple(PREFIXES.values()))}
    env.update({f"{prefix}PORT": "0", f"{prefix}METRICS_PORT": "0", f"{prefix}GRACE_SECONDS": "2"})
    if name == "auth":
        env.update({"AUTH_DATA_DIR": str(workdir / "auth"), "AUTH_HASH_PROFILE": "development"})
    if name == "inference":
        (workdir / "models").mkdir(parents=True, exist_ok=True)
        env["INFERENCE_MODEL_REPOSITORY"] = str(workdir / "models")
    env.update({f"{prefix}{key.upper()}": value for key, value in settings.items()})
    env.update(env_extra or {})
    process = subprocess.Popen(
        [sys.executable, "-m", f"services.{name}"],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    service = ServiceProcess(name, process)
    service._pump_thread = threading.Thread(target=service._pump, daemon=True)
    service._pump_thread.start()
    try:
        started = service.wait_for_event("server.started")
        if name == "inference":
            service.wait_for_event("inference.readiness")
        if name == "gateway":
            service.wait_for_event("gateway.upstreams")
    except BaseException:
        service.stop()
        raise
    service.port = started["port"]
    service.metrics_port = started["metrics_port"]
    return service
