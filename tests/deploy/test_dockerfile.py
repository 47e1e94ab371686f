"""deploy/docker/Dockerfile and .dockerignore (no Docker engine here: hadolint plus the file's
properties: multi-stage, pinned base, locked requirements, non-root, read-only friendly, exec form)."""

from __future__ import annotations

import fnmatch
import json
import re
import tomllib
from dataclasses import dataclass, field

import pytest

from tests.conftest import REPO
from tests.deploy.conftest import DEPLOY, PREFIXES, readme_ports, run, service_of, setting_names, tool

DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
USER_ID = 10001
WRITABLE = {"/var/lib/ml-platform/auth": "AUTH_DATA_DIR"}
# Every path written at run time, each documented in the Dockerfile's header as a mount.
MOUNTS = ("/var/lib/ml-platform/auth", "/var/lib/ml-platform/auth-keys", "/tmp", "/dev/shm")  # noqa: S108
LOCAL_STATE = [
    ".git",
    ".venv/bin/python",
    "node_modules/x",
    "models/iris/1/model.skops",
    "data/auth/auth.db",
    "tests/x.py",
    "services/auth/__pycache__/app.cpython-311.pyc",
    "deploy/k8s/overlays/prod/secrets/signing_key.pem",
]


@dataclass
class Stage:
    base: str
    name: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]

    def env(self) -> dict[str, str]:
        values: dict[str, str] = {}
        for args in self.all("ENV"):
            values.update(dict(re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=(\S+)", args)))
        return values


def instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction, continuation lines joined, comments dropped."""
    result: list[tuple[str, str]] = []
    current = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        keyword, _, args = current.partition(" ")
        result.append((keyword.upper(), args.strip()))
        current = ""
    assert not current, "the Dockerfile ends inside a continued line"
    return result


@pytest.fixture(scope="module")
def parsed() -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the stages in order."""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for keyword, rest in instructions(DOCKERFILE.read_text()):
        if keyword == "FROM":
            match = re.fullmatch(r"(\S+)(?:\s+AS\s+(\S+))?", rest, re.IGNORECASE)
            assert match, rest
            stages.append(Stage(match.group(1), match.group(2) or ""))
        elif not stages:
            assert keyword == "ARG", f"{keyword} before the first FROM"
            name, _, default = rest.partition("=")
            args[name] = default
        else:
            stages[-1].instructions.append((keyword, rest))
    return args, stages


def test_hadolint_finds_nothing():
    out = run([tool("hadolint"), "--no-color", str(DOCKERFILE)])
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip() == ""


def test_multi_stage_on_a_pinned_slim_python(parsed):
    args, stages = parsed
    assert len(stages) >= 2
    image = args["PYTHON_IMAGE"]
    match = re.fullmatch(r"python:(3\.\d+)\.\d+-slim-[a-z]+@sha256:[0-9a-f]{64}", image)
    assert match, f"base image {image} is not an exact slim tag pinned by digest"
    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    assert f">={match.group(1)}" in requires, f"Python {match.group(1)} vs requires-python {requires}"
    names = set()
    for stage in stages:
        assert stage.base == "${PYTHON_IMAGE}" or stage.base in names, f"FROM {stage.base}: not the pinned base"
        names.add(stage.name)
    assert stages[-1].base == "${PYTHON_IMAGE}", "the final stage starts clean from the base image"


def test_dependencies_come_from_the_lock(parsed):
    _, stages = parsed
    installs = [args for stage in stages for args in stage.all("RUN") if " install " in args]
    assert installs
    for args in installs:
        for command in re.split(r"&&", args):
            if re.search(r"\bpip\b.*\binstall\b", command):
                assert "--constraint requirements.lock" in command or "--no-deps" in command, command


def test_build_tools_stay_out_of_the_final_image(parsed):
    _, stages = parsed
    final = stages[-1]
    assert not any("pip" in args and "install" in args for args in final.all("RUN")), "no installs in the final stage"
    assert not any("apt-get" in args for args in final.all("RUN"))
    copies = final.all("COPY")
    for args in copies:
        if "--from=" in args:
            assert re.search(r"--from=\S+ /opt/(venv|models) ", args), args
    assert not any("skl2onnx" in args for args in final.all("RUN"))


def test_runs_as_a_non_root_user(parsed):
    _, stages = parsed
    users = stages[-1].all("USER")
    assert users, "the final stage sets USER"
    user, _, group = users[-1].partition(":")
    assert int(user) == USER_ID != 0
    assert not group or int(group) == USER_ID
    runs = " ".join(stages[-1].all("RUN"))
    assert f"--uid {USER_ID}" in runs


def test_read_only_root_filesystem_friendly(parsed):
    _, stages = parsed
    final = stages[-1]
    env = final.env()
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env["HOME"] == "/tmp", "HOME on the writable /tmp mount (onnxruntime writes ~/.cache)"  # noqa: S108
    runs = " ".join(final.all("RUN"))
    for path, variable in WRITABLE.items():
        assert env[variable] == path
        assert re.search(rf"install -d -o {USER_ID} -g {USER_ID} -m 07\d0 {re.escape(path)}", runs), path
    comments = DOCKERFILE.read_text()
    for path in MOUNTS:
        assert re.search(rf"^#\s+{re.escape(path)}\s", comments, re.MULTILINE), f"{path} documented as writable"


def test_environment_names_real_settings(parsed):
    _, stages = parsed
    for name, value in stages[-1].env().items():
        owner = service_of(name)
        if owner:
            assert name in setting_names(owner), name
            if name.endswith("_HOST"):
                assert value == "0.0.0.0"  # noqa: S104  (inside a container)
    assert {f"{prefix}HOST" for prefix in PREFIXES.values()} <= set(stages[-1].env())


def test_exec_form_command_runs_a_service(parsed):
    _, stages = parsed
    final = stages[-1]
    for keyword in ("CMD", "ENTRYPOINT"):
        for args in final.all(keyword):
            assert args.startswith("["), f"{keyword} {args}: shell form would keep SIGTERM from Python"
    command = json.loads(final.all("CMD")[-1])
    assert command[:2] == ["python", "-m"]
    assert command[2] in {f"services.{name}" for name in PREFIXES}
    assert not final.all("ENTRYPOINT"), "no wrapper: the command alone picks the service"


def test_exposes_the_readme_ports(parsed):
    _, stages = parsed
    exposed = {int(p) for args in stages[-1].all("EXPOSE") for p in args.split()}
    assert exposed == {p for ports in readme_ports().values() for p in ports}


# -- .dockerignore ------------------------------------------------------------------------------


def excluded(path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    patterns = [
        line.strip() for line in DOCKERIGNORE.read_text().splitlines() if line.strip() and not line.startswith("#")
    ]
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    result = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        body = pattern.lstrip("!").rstrip("/")
        if any(fnmatch.fnmatch(candidate, body) for candidate in candidates):
            result = not negated
    return result


def test_dockerignore_lets_in_what_the_build_copies(parsed):
    _, stages = parsed
    sources = []
    for stage in stages:
        for args in stage.all("COPY"):
            if "--from=" not in args:
                sources.extend(p.rstrip("/") for p in args.split()[:-1] if not p.startswith("--"))
    assert sources
    for source in sources:
        assert (REPO / source).exists(), source
        assert not excluded(source), f".dockerignore keeps out {source}, which the Dockerfile copies"
    for path in ("services/auth/common_passwords.txt", "gen/auth/v1/auth_pb2.py"):
        assert not excluded(path), path


@pytest.mark.parametrize("path", LOCAL_STATE)
def test_dockerignore_keeps_out_local_state(path):
    assert excluded(path), path
