"""The container image, without Docker: the Dockerfile is read here, and the command it runs is run with its
ENV values (the volume and the virtualenv mapped to local paths, the listener moved to a free loopback
port), so the settings an image starts with are tested the way `docker run` would use them."""

import fnmatch
import json
import logging
import os
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import ISSUED_SECRETS, free_port, leaked_secrets

log = logging.getLogger("apikeyd.container")  # the server's own lines, re-logged for the suite's secret check
ROOT = Path(__file__).resolve().parent.parent
VENV = Path(sys.executable).parent.parent  # stands in for the image's /opt/apikeyd
IMAGE_VENV = "/opt/apikeyd"
METRICS_PORT = 9464


@dataclass
class Stage:
    image: str
    name: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, instruction: str) -> list[str]:
        return [args for name, args in self.instructions if name == instruction]

    def last(self, instruction: str) -> str:
        found = self.all(instruction)
        assert found, f"no {instruction} in the final stage"
        return found[-1]


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    logical: list[str] = []
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1].strip() + " "
            continue
        logical.append(current + line)
        current = ""
    assert not current.strip(), "the Dockerfile ends inside a continued line"
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip()) for line in logical]


def _stages(text: str) -> list[Stage]:
    stages: list[Stage] = []
    for name, args in _instructions(text):
        if name == "FROM":
            words = args.split()
            stages.append(Stage(words[0], words[2] if len(words) == 3 and words[1].upper() == "AS" else ""))
        else:
            assert stages, f"{name} before the first FROM"
            stages[-1].instructions.append((name, args))
    return stages


def _exec_form(args: str) -> list[str]:
    """ENTRYPOINT, CMD and HEALTHCHECK CMD must be JSON arrays: the shell form would put /bin/sh in as PID 1,
    and SIGTERM would never reach apikeyd."""
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(word, str) for word in value), args
    return value


def _env(stage: Stage) -> dict[str, str]:
    values: dict[str, str] = {}
    for args in stage.all("ENV"):
        words = shlex.split(args)
        if "=" not in words[0]:  # the old `ENV NAME value` form
            values[words[0]] = args.split(None, 1)[1]
            continue
        for word in words:
            name, _, value = word.partition("=")
            values[name] = value
    return values


@dataclass(frozen=True)
class Image:
    stages: list[Stage]
    final: Stage
    env: dict[str, str]
    volumes: list[str]
    command: list[str]


@pytest.fixture(scope="module")
def image() -> Image:
    stages = _stages((ROOT / "Dockerfile").read_text())
    final = stages[-1]
    volumes = [
        path
        for args in final.all("VOLUME")
        for path in (json.loads(args) if args.startswith("[") else args.split())
    ]
    command = _exec_form(final.last("ENTRYPOINT")) + _exec_form(final.last("CMD"))
    return Image(stages, final, _env(final), volumes, command)



def test_the_image_is_built_in_a_builder_stage_and_runs_on_python_3_11_slim(image):
    assert len(image.stages) >= 2
    builder = [stage for stage in image.stages[:-1] if stage.name]
    assert builder, "the build stage needs a name for COPY --from"
    assert image.final.image == "python:3.11-slim"
    copies = image.final.all("COPY")
    assert any(f"--from={builder[0].name}" in args and IMAGE_VENV in args for args in copies), copies
    # the builder installs into the virtualenv the final stage copies and puts first on PATH
    assert any(IMAGE_VENV in args for args in builder[0].all("RUN"))
    assert image.env["PATH"].startswith(f"{IMAGE_VENV}/bin:")


def test_the_image_runs_as_a_user_without_rights(image):
    user = image.final.last("USER").split(":")[0]
    assert user not in ("root", "0", "")
    # numeric, so that Kubernetes' runAsNonRoot can check it
    assert user.isdigit()


def test_the_image_serves_on_every_interface_exposes_grpc_ext_authz_and_metrics_and_keeps_sqlite_on_a_volume(image):
    assert image.command == ["apikeyd", "serve"]
    host, _, port = image.env["APIKEYD_LISTEN"].rpartition(":")
    assert host == "0.0.0.0"
    metrics_host, _, metrics_port = image.env["APIKEYD_METRICS_LISTEN"].rpartition(":")
    assert (metrics_host, metrics_port) == ("0.0.0.0", str(METRICS_PORT))
    ext_authz_host, _, ext_authz_port = image.env["APIKEYD_EXT_AUTHZ_LISTEN"].rpartition(":")
    assert ext_authz_host == "0.0.0.0"
    exposed = {word.split("/")[0] for args in image.final.all("EXPOSE") for word in args.split()}
    assert {port, metrics_port, ext_authz_port} <= exposed
    database = image.env["APIKEYD_DATABASE_URL"]
    assert database.startswith("sqlite:////")
    assert str(Path(database.removeprefix("sqlite:///")).parent) in image.volumes


def test_the_healthcheck_asks_apikeyd_health(image):
    args = image.final.last("HEALTHCHECK")
    options, _, command = args.partition("CMD")
    assert all(option.startswith("--") for option in options.split()), options
    assert _exec_form(command.strip()) == ["apikeyd", "health"]
    # `apikeyd health` asks 127.0.0.1:50051 unless APIKEYD_ADDRESS says otherwise
    assert (
        image.env.get("APIKEYD_ADDRESS", "127.0.0.1:50051").rpartition(":")[2]
        == (image.env["APIKEYD_LISTEN"].rpartition(":")[2])
    )


def _ignored(path: str, patterns: list[str]) -> bool:
    """Close enough to Docker's rules for these patterns: a path is out when it or a folder above it matches
    (`**/` matching any depth, the top included), unless a later `!` pattern brings it back."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    out = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        pattern = pattern.removeprefix("!").strip("/")
        variants = [pattern] + ([pattern[3:]] if pattern.startswith("**/") else [])
        if any(fnmatch.fnmatchcase(prefix, variant) for prefix in prefixes for variant in variants):
            out = not negated
    return out


def test_dockerignore_keeps_local_state_out_and_the_build_inputs_in(image):
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for path in (
        ".venv/bin/python",
        ".git/HEAD",
        "apikeyd.db",
        "apikeyd.db-wal",
        "src/apikeyd/local.db",
        "src/apikeyd.egg-info/PKG-INFO",
        "src/apikeyd/__pycache__/cli.cpython-311.pyc",
    ):
        assert _ignored(path, patterns), f"{path} would be sent to the build"
    needed = [
        "pyproject.toml",
        "README.md",
        "src/apikeyd/cli/__init__.py",
        "src/apikeyd/store/migrations/script.py.mako",
    ]
    for stage in image.stages:
        for args in stage.all("COPY"):
            words = [word for word in args.split() if not word.startswith("--")]
            needed += [word.removeprefix("./") for word in words[:-1] if not args.startswith("--from")]
    for path in needed:
        assert not _ignored(path, patterns), f"{path} is needed by the build but ignored"


def _local(image: Image, volume_dir: Path) -> tuple[dict[str, str], Path, str]:
    """The image's environment as this machine runs it: the volume in a temporary folder, the image's
    virtualenv as this one, the listener on a free loopback port."""
    assert len(image.volumes) == 1
    env = {name: value for name, value in os.environ.items() if not name.startswith("APIKEYD_")}
    for name, value in image.env.items():
        value = value.replace(image.volumes[0], str(volume_dir)).replace(IMAGE_VENV, str(VENV))
        env[name] = value.replace("${PATH}", "$PATH").replace("$PATH", os.environ.get("PATH", ""))
    # every listener on a free loopback port: tests run side by side, and 0.0.0.0 is for containers
    for name, value in list(env.items()):
        if name.startswith("APIKEYD_") and name.endswith("LISTEN") and value:
            env[name] = f"127.0.0.1:{free_port()}"
    address = env["APIKEYD_LISTEN"]
    workdir = image.final.all("WORKDIR")[-1] if image.final.all("WORKDIR") else "/"
    cwd = Path(workdir.replace(image.volumes[0], str(volume_dir)))
    return env, cwd, address


def _wait_serving(address: str, process: subprocess.Popen[str]) -> None:
    with grpc.insecure_channel(address) as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=30)
        except grpc.FutureTimeoutError:
            process.kill()
            pytest.fail(f"the image's command did not come up: {process.communicate()[1]}")
        health = health_pb2_grpc.HealthStub(channel)
        status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.SERVING


def _has_health_command(env: dict[str, str]) -> bool:
    result = subprocess.run(
        ["apikeyd", "health", "--help"], env=env, capture_output=True, timeout=60, check=False
    )
    return result.returncode == 0


def test_the_images_command_serves_with_its_settings_and_stops_on_sigterm(image, tmp_path):
    volume = tmp_path / "data"
    volume.mkdir()
    env, cwd, address = _local(image, volume)
    process = subprocess.Popen(image.command, env=env, cwd=cwd, stderr=subprocess.PIPE, text=True)
    try:
        _wait_serving(address, process)
        # the SQLite file is on the volume, migrated by serve itself
        assert (volume / Path(image.env["APIKEYD_DATABASE_URL"]).name).is_file()
        # an operator key made the way README's `docker exec ... apikeyd admin-key create` does
        created = subprocess.run(
            ["apikeyd", "admin-key", "create", "--display-name", "container"],
            env=env, cwd=cwd, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert created.returncode == 0, created.stderr
        token = created.stdout.strip()
        ISSUED_SECRETS.add(token)
    finally:
        process.send_signal(signal.SIGTERM)  # what `docker stop` sends to PID 1
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr
    assert "stopped" in stderr
    # what `docker logs` would show: into the suite's log check too
    log.info("the image's command logged:\n%s", stderr)
    assert leaked_secrets(stderr + created.stderr, {token}) == []


def test_the_healthcheck_command_says_serving_and_fails_when_nothing_serves(image, tmp_path):
    volume = tmp_path / "data"
    volume.mkdir()
    env, cwd, address = _local(image, volume)
    if not _has_health_command(env):
        pytest.skip("`apikeyd health` is not there yet")
    healthcheck = _exec_form(image.final.last("HEALTHCHECK").partition("CMD")[2].strip())
    check_env = {**env, "APIKEYD_ADDRESS": address}  # the image's default address, at the moved port
    process = subprocess.Popen(image.command, env=env, cwd=cwd, stderr=subprocess.PIPE, text=True)
    try:
        _wait_serving(address, process)
        result = subprocess.run(
            healthcheck, env=check_env, cwd=cwd, capture_output=True, text=True, timeout=60, check=False
        )
        assert result.returncode == 0, result.stderr
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr
    result = subprocess.run(
        healthcheck, env=check_env, cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode != 0
