"""docs/metrics.md against what each real service's /metrics serves, both ways; promtool lints every scrape.

Each service is started in this process (the `start_service` fixture), used a little so that its labelled series
appear, and scraped. One CASES line per service: a new service is one more line.
"""

from __future__ import annotations

import asyncio
import shutil
import urllib.request
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from auth.v1 import auth_pb2, auth_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from inference import grpc_service_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from services.common.server import GrpcServer
from services.inference import codec
from tests.conftest import REPO
from tests.inference.conftest import eventually_async
from tests.observability.test_alerts import catalogue, family_of, run_promtool

Connect = Callable[[GrpcServer], grpc.aio.Channel]
PASSWORD = "a perfectly fine passphrase"


async def health_check(server: GrpcServer, connect: Connect) -> None:
    """Enough for the chassis' grpc_server_* series: one health check."""
    stub = health_pb2_grpc.HealthStub(connect(server))
    await stub.Check(health_pb2.HealthCheckRequest(service="liveness"), timeout=10)


async def use_auth(server: GrpcServer, connect: Connect) -> None:
    """A success, a wrong password and a login refused by the per-account limit (2 a minute)."""
    stub = auth_pb2_grpc.AuthServiceStub(connect(server))
    await stub.Register(
        auth_pb2.RegisterRequest(username="mia", email="mia@example.com", password=PASSWORD), timeout=10
    )
    await stub.Login(auth_pb2.LoginRequest(username="mia", password=PASSWORD), timeout=10)
    for code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.RESOURCE_EXHAUSTED):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Login(auth_pb2.LoginRequest(username="mia", password="not the passphrase at all"), timeout=10)
        assert refused.value.code() == code


def slow_model(tmp_path: Path) -> dict[str, Any]:
    """A repository with `slow` (sleeps INPUT0 seconds, up to 2 workers), a 1 s inference timeout, and an
    autoscaler that may add a worker as soon as requests wait."""
    repository = tmp_path / "catalogue-models"
    shutil.copytree(REPO / "tests" / "testdata" / "models" / "sleepy", repository / "slow")
    config = repository / "slow" / "config.yaml"
    config.write_text(config.read_text().replace("instances: {min: 1, max: 1}", "instances: {min: 1, max: 2}"))
    shutil.copytree(REPO / "tests" / "testdata" / "models" / "batchy", repository / "batchy")
    return {
        "model_repository": repository,
        "worker_cpu_budget": 4,  # `slow` sleeps: not CPU-bound
        "timeout_seconds": 1.0,
        "autoscale_interval_seconds": 0.2,
        "scale_cooldown_seconds": 0.0,
    }


async def use_inference(server: GrpcServer, connect: Connect) -> None:
    """Three 3-second inferences at once on one worker: one times out on the worker (which is replaced), the
    others wait in the queue (and make the pool scale up) and time out there. Then a dynamic batch."""
    stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(connect(server))
    request = codec.make_infer_request("slow", {"INPUT0": ("FP32", np.full((1, 1), 3.0, dtype=np.float32))})
    results = await asyncio.gather(*(stub.ModelInfer(request, timeout=10) for _ in range(3)), return_exceptions=True)
    assert all(isinstance(r, grpc.aio.AioRpcError) for r in results), results
    assert {r.code() for r in results} == {grpc.StatusCode.DEADLINE_EXCEEDED}, results
    # One request keeps batchy's worker busy; the three sent with it wait and ride one call together.
    values = [0.3, 0.0, 0.0, 0.0]
    batched = [
        codec.make_infer_request("batchy", {"INPUT0": ("FP32", np.full((1, 1), value, dtype=np.float32))})
        for value in values
    ]
    answers = await asyncio.gather(*(stub.ModelInfer(request, timeout=10) for request in batched))
    assert [codec.response_arrays(answer)["OUTPUT1"].tolist() for answer in answers] == [[1], [3], [3], [3]]


@dataclass(frozen=True)
class Case:
    service: str  # the start_service name, and the "## " section of docs/metrics.md
    use: Callable[[GrpcServer, Connect], Awaitable[None]] = health_check
    settings: Callable[[Path], dict[str, Any]] = lambda tmp_path: {}
    unsampled: frozenset[str] = field(default_factory=frozenset)  # families allowed to have no series yet


CASES = [
    Case("auth", use_auth, lambda tmp_path: {"login_rate_per_account": "2/minute"}),
    Case("inference", use_inference, slow_model),
    Case("gateway"),  # chassis metrics only; start_service starts auth and inference behind it
]


def scrape(server: GrpcServer) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5) as response:
        return response.read().decode()


def served_families(text: str) -> dict[str, str]:
    """Metric family -> type, from the `# TYPE` lines."""
    return {
        parts[2]: parts[3]
        for line in text.splitlines()
        if line.startswith("# TYPE ") and len(parts := line.split()) == 4
    }


def served_labels(text: str, families: dict[str, str]) -> dict[str, set[frozenset[str]]]:
    """Metric family -> the label-name sets of its series (`le` of histogram buckets left out)."""
    labels: dict[str, set[frozenset[str]]] = defaultdict(set)
    for parsed in text_string_to_metric_families(text):
        for sample in parsed.samples:
            family = family_of(sample.name, families)
            assert family is not None, f"series {sample.name} of no # TYPE'd family"
            labels[family].add(frozenset(sample.labels) - {"le"})
    return labels


@pytest.mark.parametrize("case", CASES, ids=[case.service for case in CASES])
async def test_metrics_served_match_the_catalogue(case: Case, start_service, channel_to, tmp_path):
    server = await start_service(case.service, **case.settings(tmp_path))
    await case.use(server, channel_to)

    # Some series appear a moment after the calls (a worker's restart, a client call's completion).
    async def complete() -> str | None:
        text = await asyncio.to_thread(scrape, server)
        families = served_families(text)
        return text if set(families) - case.unsampled <= set(served_labels(text, families)) else None

    try:
        text = await eventually_async(complete, within=30)
    except TimeoutError:  # the assertions below say what is missing
        text = await asyncio.to_thread(scrape, server)
    families = served_families(text)
    labels = served_labels(text, families)

    documented = {row.name: row for row in catalogue() if row.section.split()[0] == case.service}
    assert documented, f"docs/metrics.md has no `## {case.service}` section with a metrics table"
    undocumented = sorted(set(families) - set(documented))
    unserved = sorted(set(documented) - set(families))
    assert (undocumented, unserved) == ([], []), (
        f"{case.service}: served but not in docs/metrics.md: {undocumented}; "
        f"in docs/metrics.md but not served: {unserved}"
    )
    wrong_types = {
        name: (kind, documented[name].type) for name, kind in families.items() if documented[name].type != kind
    }
    assert not wrong_types, f"{case.service}: (served, documented) types differ: {wrong_types}"
    unsampled = sorted(set(families) - set(labels) - case.unsampled)
    assert not unsampled, f"{case.service}: the calls made no series of {unsampled}: use them in the case's `use`"
    wrong_labels = {
        name: (sorted(map(sorted, label_sets)), sorted(documented[name].labels))
        for name, label_sets in labels.items()
        if label_sets != {documented[name].labels}
    }
    assert not wrong_labels, f"{case.service}: (served, documented) label names differ: {wrong_labels}"

    lint = await asyncio.to_thread(run_promtool, "check", "metrics", stdin=text)
    assert lint.returncode == 0, f"{case.service}: promtool check metrics:\n{lint.stdout}{lint.stderr}"


def test_every_service_section_of_the_catalogue_is_tested():
    """A `## name` section whose name starts a service must be covered by a CASES line (Prometheus' own is not)."""
    sections = {row.section.split()[0] for row in catalogue()}
    assert sections - {"Prometheus"} == {case.service for case in CASES}
