"""What the benchmarks share: a pinned copy of demo models, an auth server that measures nothing but itself,
percentiles, and CPU readings from /proc."""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from services.auth.settings import AuthSettings

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
UNLIMITED = "1000000/minute"  # a login rate no benchmark reaches


def bench_auth_settings(data_dir: Path, **common: Any) -> AuthSettings:
    """Auth for a benchmark's gateway: the fast hash profile, no login limits, the loopback proxy trusted."""
    from services.auth.settings import AuthSettings

    return AuthSettings(
        **common,
        data_dir=data_dir,
        hash_profile="development",
        login_rate_per_ip=UNLIMITED,
        login_rate_per_account=UNLIMITED,
        trusted_proxies=["127.0.0.1/32"],
    )


def pinned_repository(root: Path, source: Path, names: Sequence[str], low: int, high: int | None = None) -> Path:
    """``root/models``: copies of ``names`` from ``source``, each served by ``low``..``high`` worker processes."""
    repository = root / "models"
    for name in names:
        target = repository / name
        shutil.copytree(source / name, target)
        config_file = target / "config.yaml"
        config = yaml.safe_load(config_file.read_text())
        config["instances"] = {"min": low, "max": low if high is None else high}
        config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    return repository


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def process_cpu(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLOCK_TICKS, int(fields[12]) / CLOCK_TICKS  # utime, stime


def machine_busy() -> float:
    """CPU seconds the whole machine has spent busy (all cores, everything but idle and iowait)."""
    ticks = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / CLOCK_TICKS


def process_tree(root: int) -> list[int]:
    """``root`` and every live descendant of it (from the parent ids in /proc), root first."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # gone meanwhile
            continue
        parent = int(text.rsplit(")", 1)[1].split()[1])  # the field after the state
        children.setdefault(parent, []).append(int(stat.parent.name))
    tree, pending = [], [root]
    while pending:
        pid = pending.pop()
        tree.append(pid)
        pending += children.get(pid, [])
    return tree


def tree_cpu(root: int) -> tuple[float, float]:
    """CPU seconds (user + system) so far of ``root`` itself and of all its descendants, live or reaped.

    A live process counts its own time; a child that has exited and been waited for is in its parent's
    cutime/cstime, so a worker replaced between two readings is not lost.
    """
    own = descendants = 0.0
    for pid in process_tree(root):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        seconds = [int(value) / CLOCK_TICKS for value in fields[11:15]]  # utime, stime, cutime, cstime
        if pid == root:
            own += seconds[0] + seconds[1]
            descendants += seconds[2] + seconds[3]
        else:
            descendants += sum(seconds)
    return own, descendants
