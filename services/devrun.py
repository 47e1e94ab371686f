"""``python -m services.devrun`` (``make run``): all three services in the foreground.

Starts auth, inference and gateway as child processes on their default ports with
human-readable logs (set ``<PREFIX>LOG_FORMAT=json`` to keep JSON), and stops them all with
SIGTERM on Ctrl-C or SIGTERM. If one exits on its own, the others are stopped too and the
exit code is non-zero.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from types import FrameType

SERVICES = (("auth", "AUTH_"), ("inference", "INFERENCE_"), ("gateway", "GATEWAY_"))
STOP_TIMEOUT_SECONDS = 60.0


def main() -> int:
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    children: list[tuple[str, subprocess.Popen[bytes]]] = []
    for name, prefix in SERVICES:
        env = dict(os.environ)
        env.setdefault(f"{prefix}LOG_FORMAT", "console")
        if name == "auth":  # the gateway forwards callers' IPs from loopback
            env.setdefault("AUTH_TRUSTED_PROXIES", '["127.0.0.1/32", "::1/128"]')
        children.append((name, subprocess.Popen([sys.executable, "-m", f"services.{name}"], env=env)))  # noqa: S603

    failed: list[str] = []

    def watch(name: str, child: subprocess.Popen[bytes]) -> None:
        if child.wait() != 0 and not stop.is_set():
            failed.append(f"{name} exited with code {child.returncode}")
        stop.set()

    for name, child in children:
        threading.Thread(target=watch, args=(name, child), daemon=True).start()

    stop.wait()
    for _, child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    codes = {}
    for name, child in children:
        try:
            codes[name] = child.wait(timeout=STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            child.kill()
            codes[name] = child.wait()
    for problem in failed:
        print(f"devrun: {problem}", file=sys.stderr)  # noqa: T201
    return 1 if failed or any(codes.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
