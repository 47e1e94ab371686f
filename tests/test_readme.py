"""The README documents every setting, names no setting that does not exist, and every shell block of it runs.

The shell blocks run in document order, each in its own ``bash -euo pipefail``, against one live stack (auth,
inference serving the demo model iris, gateway: real processes on free ports). The blocks read those ports from the
services' own variables (``${GATEWAY_PORT:-50051}``), so a reader's copy uses the defaults unchanged.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus
from pathlib import Path

import pytest

from services.common.settings import env_name
from tests.conftest import ENV_PREFIXES, REPO, SERVICES
from tests.processes import ServiceProcess, start_service
from tests.readme_shell import Block, parse, runnable

README = (REPO / "README.md").read_text()
BLOCKS, MARKERS = parse(README)
RUNNABLE = runnable(README)


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_every_setting_is_documented(name):
    settings_cls, _ = SERVICES[name]
    for field in settings_cls.model_fields:
        assert f"`{env_name(settings_cls, field)}`" in README


def test_readme_names_only_real_settings():
    known = {env_name(cls, field) for cls, _ in SERVICES.values() for field in cls.model_fields}
    mentioned = set(re.findall(r"`((?:AUTH|GATEWAY|INFERENCE)_[A-Z_]+)`", README))
    assert mentioned <= known, mentioned - known


def test_readme_leads_with_the_two_commands():
    first_block = README.split("```")[1]
    assert "make run" in first_block
    assert "make test" in first_block


# -- the shell blocks -------------------------------------------------------------------------------------------


def test_every_skip_marker_gives_a_reason_and_stands_before_a_shell_block():
    assert MARKERS, "the README marks no block (at least `make run` must not run here)"
    for marker in MARKERS:
        where = f"README.md line {marker.line}: <!-- readme-test:{marker.body}-->"
        assert marker.skip_reason, f"{where}: write it as `skip (the reason)`"
        assert marker.block is not None, f"{where}: no fenced block follows it"
        assert marker.block.is_shell, f"{where}: the block after it is {marker.block.language or 'plain'}, never run"


def test_the_two_commands_do_not_run_here_and_the_walkthrough_does():
    shell = [block for block in BLOCKS if block.is_shell]
    assert "make run" in shell[0].text
    assert shell[0] not in RUNNABLE
    assert any("grpcurl" in block.text for block in RUNNABLE)


def test_blocks_and_markers_are_read_as_written():
    sample = "\n".join(
        [
            "<!-- readme-test: skip (needs a cluster) -->",
            "",
            "```bash",
            "kubectl apply -k deploy/",
            "```",
            "- a list item:",
            "  ```sh",
            "  echo indented \\",
            "    continued",
            "  ```",
            "<!-- readme-test: skip -->",
            "<!-- readme-test: skip () -->",
            "```console",
            "$ echo one \\",
            "  two",
            "one two",
            "$ true",
            "```",
            "<!-- readme-test: skip (stray) -->",
            "text about `<!-- readme-test: skip (reason) -->` markers",
            "```python",
            "print('not shell')",
            "```",
        ]
    )
    blocks, markers = parse(sample)
    assert [(block.line, block.language) for block in blocks] == [
        (3, "bash"),
        (7, "sh"),
        (13, "console"),
        (21, "python"),
    ]
    assert blocks[1].text == "echo indented \\\n  continued\n"
    assert blocks[2].script() == "echo one \\\n  two\ntrue\n"
    assert [(marker.line, marker.skip_reason, marker.block) for marker in markers] == [
        (1, "needs a cluster", blocks[0]),
        (11, None, blocks[2]),  # no reason: not a skip (the marker test above refuses both)
        (12, "", blocks[2]),
        (19, "stray", None),
    ]
    assert runnable(sample) == [blocks[1], blocks[2]]


def wait_until_serving_models(gateway: ServiceProcess, within: float = 30.0) -> None:
    """Poll the gateway's /internal/ml/health until it answers 200: it has seen a ready worker of every model."""
    url = f"http://127.0.0.1:{gateway.metrics_port}/internal/ml/health"
    deadline = time.monotonic() + within
    answer = "none"
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == HTTPStatus.OK:
                    return
                answer = str(response.status)
        except urllib.error.HTTPError as error:
            answer = f"{error.code}: {error.read().decode(errors='replace')}"
        except urllib.error.URLError as error:
            answer = str(error.reason)
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} not 200 within {within}s; last answer {answer}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def live_stack(demo_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """The environment of a shell whose services run on these ports (and whose auth CLI uses that data)."""
    workdir = tmp_path_factory.mktemp("readme-stack")
    (workdir / "models").mkdir()
    shutil.copytree(demo_models / "iris", workdir / "models" / "iris")
    started: list[ServiceProcess] = []
    try:
        with ThreadPoolExecutor(2) as pool:
            upstreams = [pool.submit(start_service, name, workdir) for name in ("auth", "inference")]
            for future in upstreams:
                started.append(future.result())
        auth, inference = started
        gateway = start_service(
            "gateway",
            workdir,
            auth_target=f"dns:///{auth.address}",
            inference_target=f"dns:///{inference.address}",
        )
        started.append(gateway)
        wait_until_serving_models(gateway)
        env = {name: value for name, value in os.environ.items() if not name.startswith(ENV_PREFIXES)}
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", os.defpath)])
        for service in started:
            prefix = service.name.upper()
            env[f"{prefix}_PORT"] = str(service.port)
            env[f"{prefix}_METRICS_PORT"] = str(service.metrics_port)
        env.update({"AUTH_DATA_DIR": str(workdir / "auth"), "AUTH_HASH_PROFILE": "development"})
        yield env
    finally:
        for service in reversed(started):
            service.stop()


@pytest.mark.parametrize("block", RUNNABLE, ids=[f"line-{block.line}" for block in RUNNABLE])
def test_shell_block_runs(block: Block, live_stack: dict[str, str], tmp_path: Path):
    result = subprocess.run(
        ["bash", "--noprofile", "--norc", "-euo", "pipefail", "-c", block.script()],
        cwd=tmp_path,
        env=live_stack,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, (
        f"README.md block at line {block.line} exited {result.returncode}\n--- script\n{block.script()}"
        f"--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-3000:]}"
    )
