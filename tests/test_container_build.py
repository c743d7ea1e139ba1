"""The image built and run for real (`make container-test`; plain `pytest` deselects the `container` marker).

A Docker daemon of its own is started here: its own socket, pid file and exec root in a temporary folder, its
images in .venv/container-cache (so the base image is made once per clone). It runs without a bridge, without
iptables rules and without touching ip_forward, so the only host changes are the files and cgroups below,
which the teardown removes, by the PIDs this module started. The container uses the host's network: its gRPC
port is a free loopback port set through APIKEYD_LISTEN (publishing with -p would need the bridge).

No registry can be reached here, so when `python:3.11-slim` cannot be pulled a stand-in is made from
Debian's packages (mmdebstrap, Debian's python3 3.11), with this machine's extra CA certificates in it:
pip inside the build reaches the package index through them.
"""

import contextlib
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from apikeyd.v1 import api_keys_pb2_grpc as pb_grpc
from tests.conftest import ISSUED_SECRETS, BearerCredentials, authorize, create_key, free_port, leaked_secrets, wait_for

pytestmark = pytest.mark.container

log = logging.getLogger("apikeyd.container")  # the container's logs, re-logged for the suite's secret check
ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".venv" / "container-cache"
# Debian's client: the one in /usr/local/bin may be a newer one whose `docker build` needs the buildx plugin.
DOCKER = Path("/usr/bin/docker")
DOCKERD = Path("/usr/sbin/dockerd")
BASE = "python:3.11-slim"
EXTRA_CA = Path("/usr/local/share/ca-certificates")
CA_LABEL = "apikeyd.extra-ca"  # on a base made here: which extra CA certificates it holds
APT_SOURCES = Path("/etc/apt/sources.list.d/debian.sources")
# What dockerd and its containerd create outside their own roots, and the cgroups its containers and builds get.
CREATED_OUTSIDE = [Path("/etc/docker"), Path("/run/docker"), Path("/run/containerd"), Path("/run/runc")]
CGROUP_PARENT = "docker"
UID = "10001"


IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")
IPTABLES_TABLES = ("filter", "nat")


@dataclass(frozen=True)
class HostNetwork:
    """What a default dockerd changes: ip_forward, the docker0 bridge, and iptables (its DOCKER* chains)."""

    ip_forward: str
    docker0: bool
    iptables: dict[str, str]  # `iptables -S` of each table: the rules without their counters

    @staticmethod
    def now() -> "HostNetwork":
        rules = {}
        if shutil.which("iptables"):
            for table in IPTABLES_TABLES:
                listed = subprocess.run(["iptables", "-t", table, "-S"], capture_output=True, text=True, check=True)
                rules[table] = listed.stdout
        return HostNetwork(IP_FORWARD.read_text().strip(), Path("/sys/class/net/docker0").exists(), rules)


def _saved_iptables() -> dict[str, str]:
    if not shutil.which("iptables-save"):
        return {}
    return {
        table: subprocess.run(["iptables-save", "-t", table], capture_output=True, text=True, check=True).stdout
        for table in IPTABLES_TABLES
    }


def _undo(before: HostNetwork, saved: dict[str, str]) -> None:
    """Puts back what the daemon's flags should have kept it from changing at all."""
    after = HostNetwork.now()
    if after.ip_forward != before.ip_forward:
        IP_FORWARD.write_text(before.ip_forward)
    if after.docker0 and not before.docker0:
        subprocess.run(["ip", "link", "delete", "docker0"], check=True)
    for table, rules in after.iptables.items():
        if rules != before.iptables[table]:
            subprocess.run(["iptables-restore", "-T", table], input=saved[table], text=True, check=True)


def _cgroups() -> list[Path]:
    """The parent cgroup in each v1 hierarchy, or the one v2 tree."""
    top = Path("/sys/fs/cgroup")
    return sorted([*top.glob(CGROUP_PARENT), *top.glob(f"*/{CGROUP_PARENT}")])


def _mounts_under(*roots: Path) -> list[str]:
    points = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    return [point for point in points if any(point.startswith(f"{root}/") for root in roots)]


@dataclass
class Engine:
    env: dict[str, str]

    def docker(self, *args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(DOCKER), *args], env=self.env, capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and result.returncode != 0:
            pytest.fail(f"docker {' '.join(args)}: exit {result.returncode}\n{result.stdout}\n{result.stderr}")
        return result

    def inspect(self, name: str, template: str) -> str:
        return self.docker("inspect", "-f", template, name).stdout.strip()


def _stop(process: subprocess.Popen[bytes], timeout: float = 60) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout)


def _stop_pid(pid: int) -> None:
    """containerd, which dockerd starts and stops itself: ended here only if dockerd left it running."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
        wait_for(lambda: not Path(f"/proc/{pid}").exists(), f"containerd {pid} ending", timeout=30)


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    if not (DOCKER.exists() and DOCKERD.exists()):
        pytest.skip("no container engine")
    if os.geteuid() != 0:
        pytest.skip("no container engine: dockerd needs root")
    before, saved = HostNetwork.now(), _saved_iptables()
    existed = {path for path in CREATED_OUTSIDE if path.exists()}
    cgroups_before = set(_cgroups())
    run = Path(tempfile.mkdtemp(prefix="apikeyd-docker-"))  # short: a unix socket path has 108 bytes at most
    CACHE.mkdir(parents=True, exist_ok=True)
    (run / "daemon.json").write_text("{}")  # not the host's /etc/docker/daemon.json
    socket = run / "docker.sock"
    log_file = (run / "dockerd.log").open("wb")
    daemon = subprocess.Popen(
        [
            str(DOCKERD),
            f"--config-file={run / 'daemon.json'}",
            f"--data-root={CACHE}",
            f"--exec-root={run / 'exec'}",
            f"--pidfile={run / 'dockerd.pid'}",
            f"--host=unix://{socket}",
            f"--cgroup-parent={CGROUP_PARENT}",
            # No bridge, no NAT, no forwarding: the host's network settings stay as they are.
            "--bridge=none",
            "--iptables=false",
            "--ip-masq=false",
            "--ip-forward=false",
        ],
        stdout=log_file,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    engine = Engine({
        **os.environ,
        "DOCKER_HOST": f"unix://{socket}",
        "DOCKER_CONFIG": str(run / "client"),  # not ~/.docker
        "DOCKER_BUILDKIT": "1",
    })  # fmt: skip
    containerd_pid: int | None = None
    try:

        def up() -> bool:
            assert daemon.poll() is None, f"dockerd exited:\n{(run / 'dockerd.log').read_text()}"
            return socket.exists() and engine.docker("version", check=False).returncode == 0

        wait_for(up, "dockerd answering", timeout=60)
        containerd_pid = int((run / "exec" / "containerd" / "containerd.pid").read_text())
        yield engine
    finally:
        _stop(daemon)
        log_file.close()
        if containerd_pid is not None:
            _stop_pid(containerd_pid)
        for point in sorted(_mounts_under(run, CACHE), reverse=True):  # the network namespace dockerd pins
            subprocess.run(["umount", point], check=True)
        shutil.rmtree(run)
        for path in CREATED_OUTSIDE:
            if path not in existed:
                shutil.rmtree(path, ignore_errors=True)
        for cgroup in set(_cgroups()) - cgroups_before:  # a cgroup folder goes with rmdir, children first
            for child in sorted(cgroup.glob("**/"), key=lambda found: len(found.parts), reverse=True):
                child.rmdir()
        changed = HostNetwork.now()
        _undo(before, saved)
    assert changed == before, f"dockerd changed the host's network settings (undone): {before} -> {changed}"


def _extra_ca_digest() -> str:
    digest = hashlib.sha256()
    for certificate in sorted(EXTRA_CA.glob("**/*.crt")):
        digest.update(certificate.name.encode() + b"\0" + certificate.read_bytes())
    return digest.hexdigest()[:16]


def _base_image(engine: Engine) -> None:
    """BASE as the registry has it, or else made here once and kept while the machine's extra CAs are the same."""
    found = engine.docker("image", "inspect", "-f", "{{json .Config.Labels}}", BASE, check=False)
    if found.returncode == 0:
        labels = json.loads(found.stdout) or {}
        if labels.get(CA_LABEL, _extra_ca_digest()) == _extra_ca_digest():  # no label: the registry's own
            return
    if engine.docker("pull", BASE, timeout=120, check=False).returncode == 0:
        return
    if not (shutil.which("mmdebstrap") and APT_SOURCES.exists()):
        pytest.fail(f"{BASE} cannot be pulled, and without mmdebstrap and {APT_SOURCES} it cannot be made")
    # The sources file as the mirror: mmdebstrap pastes it into the chroot, so the base uses this machine's
    # Debian mirror. The extra CAs are added before update-ca-certificates builds the bundle pip trusts.
    errors = tempfile.TemporaryFile()  # a file, not a pipe: a full stderr pipe would stall the tarball
    build = subprocess.Popen(
        [
            "mmdebstrap", "--variant=minbase", "--include=python3,python3-venv,ca-certificates",
            f"--customize-hook=sync-in {EXTRA_CA} {EXTRA_CA}",
            '--customize-hook=chroot "$1" update-ca-certificates',
            "bookworm", "-", str(APT_SOURCES),
        ],
        stdout=subprocess.PIPE,
        stderr=errors,
    )  # fmt: skip
    assert build.stdout is not None
    imported = subprocess.run(
        [str(DOCKER), "import", "--change", f"LABEL {CA_LABEL}={_extra_ca_digest()}", "-", BASE],
        stdin=build.stdout, env=engine.env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    build.stdout.close()
    build.wait(timeout=60)
    errors.seek(0)
    assert build.returncode == 0, errors.read().decode()[-3000:]
    assert imported.returncode == 0, imported.stderr


@pytest.fixture(scope="module")
def image(engine: Engine) -> Iterator[str]:
    _base_image(engine)
    tag = f"apikeyd:smoke-{uuid.uuid4().hex[:8]}"
    # The host's network: there is no bridge for the build's RUN steps (pip) to use.
    engine.docker("build", "--network=host", "-t", tag, str(ROOT), timeout=900)
    yield tag
    engine.docker("image", "rm", tag)


def _stub(address: str, token: str) -> tuple[grpc.Channel, pb_grpc.ApiKeyServiceStub]:
    channel = grpc.insecure_channel(address)
    return channel, pb_grpc.ApiKeyServiceStub(grpc.intercept_channel(channel, BearerCredentials(token)))


def _serving(address: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        try:
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
        except grpc.RpcError:
            return False
    return health.status == health_pb2.HealthCheckResponse.SERVING


def _run(engine: Engine, image: str, name: str, volume: str, address: str) -> None:
    engine.docker(
        "run", "--detach", "--name", name, "--network=host", "--volume", f"{volume}:/data",
        # Every listener on a free loopback port, and the HEALTHCHECK's address moved with gRPC's.
        "--env", f"APIKEYD_LISTEN={address}", "--env", f"APIKEYD_ADDRESS={address}",
        "--env", f"APIKEYD_METRICS_LISTEN=127.0.0.1:{free_port()}",
        "--env", f"APIKEYD_EXT_AUTHZ_LISTEN=127.0.0.1:{free_port()}",
        image,
    )  # fmt: skip


def _stop_with_exit_0(engine: Engine, name: str) -> str:
    """`docker stop` (SIGTERM to apikeyd as PID 1), its exit code, and what it logged."""
    engine.docker("stop", name, timeout=120)
    assert engine.inspect(name, "{{.State.ExitCode}}") == "0"
    return engine.docker("logs", name).stderr


def test_the_image_serves_is_healthy_as_uid_10001_keeps_its_data_and_stops_with_exit_0(engine, image):
    address = f"127.0.0.1:{free_port()}"
    first, second = (f"apikeyd-smoke-{uuid.uuid4().hex[:8]}" for _ in range(2))
    volume = f"{first}-data"
    logs = ""
    try:
        _run(engine, image, first, volume, address)
        # the image's own HEALTHCHECK (`apikeyd health`, every 10 s), as Docker reports it
        wait_for(
            lambda: engine.inspect(first, "{{.State.Health.Status}}") in ("healthy", "unhealthy"),
            "a health verdict", timeout=90,
        )  # fmt: skip
        assert engine.inspect(first, "{{.State.Health.Status}}") == "healthy"
        assert _serving(address)
        assert engine.docker("exec", first, "id", "-u").stdout.strip() == UID

        operator = engine.docker("exec", first, "apikeyd", "admin-key", "create", "--display-name", "smoke")
        token = operator.stdout.strip()
        ISSUED_SECRETS.add(token)
        channel, stub = _stub(address, token)
        with channel:
            key = create_key(stub, "acct-container").secret
            assert authorize(stub, key, "messages:send").allowed
        logs += _stop_with_exit_0(engine, first)

        # A new container on the same volume: what survives is in /data, not in the first one's own layer.
        engine.docker("rm", first)
        _run(engine, image, second, volume, address)
        wait_for(lambda: _serving(address), "the second container serving", timeout=60)
        channel, stub = _stub(address, token)
        with channel:  # the operator key and the key, both from the SQLite file on the volume
            assert authorize(stub, key, "messages:send").allowed
        logs += _stop_with_exit_0(engine, second)
    finally:
        engine.docker("rm", "--force", first, second, check=False)
        engine.docker("volume", "rm", "--force", volume, check=False)
    log.info("the containers logged:\n%s", logs)  # and into the suite's secret check
    assert leaked_secrets(logs + operator.stderr, {token, key}) == []
