"""The Kubernetes example in deploy/ cannot drift from the code: every setting it sets exists, its command
and flags are real, its probes and ports match its settings, and its grace period covers the drain."""

import dataclasses
from pathlib import Path
from typing import Any

import yaml
from click.testing import CliRunner

from apikeyd.cli import main
from apikeyd.config import Settings
from apikeyd.metrics import split_listen

MANIFEST = Path(__file__).resolve().parent.parent / "deploy" / "kubernetes" / "apikeyd.yaml"


def _documents() -> dict[str, Any]:
    return {doc["kind"] + "/" + doc["metadata"]["name"]: doc for doc in yaml.safe_load_all(MANIFEST.read_text())}


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {item["name"]: item.get("value", "<from a secret>") for item in container.get("env", [])}


def test_every_setting_the_example_sets_is_a_real_one_with_a_valid_value():
    known = {Settings.env_name(f.name) for f in dataclasses.fields(Settings)}
    documents = _documents()
    containers = [
        documents["Deployment/apikeyd"]["spec"]["template"]["spec"]["containers"][0],
        documents["Job/apikeyd-migrate"]["spec"]["template"]["spec"]["containers"][0],
    ]
    for container in containers:
        env = _env(container)
        assert set(env) <= known, set(env) - known
        # The values parse as the settings' types (a typo like "5s" fails here).
        Settings.load(environ={k: v for k, v in env.items() if v != "<from a secret>"})


def test_the_example_commands_and_flags_exist():
    documents = _documents()
    for name in ("Deployment/apikeyd", "Job/apikeyd-migrate"):
        args = documents[name]["spec"]["template"]["spec"]["containers"][0]["args"]
        result = CliRunner().invoke(main, [*args, "--help"])
        assert result.exit_code == 0, (args, result.output)


def test_probes_ports_and_grace_fit_the_settings():
    pod = _documents()["Deployment/apikeyd"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = _env(container)
    settings = Settings.load(environ={k: v for k, v in env.items() if v != "<from a secret>"})
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    _, grpc_port = split_listen(settings.listen)
    assert ports["grpc"] == grpc_port == container["readinessProbe"]["grpc"]["port"]
    assert ports["ext-authz"] == split_listen(settings.ext_authz_listen)[1]
    workers = int(container["args"][container["args"].index("--workers") + 1])
    _, metrics_port = split_listen(settings.metrics_listen)
    metrics_ports = sorted(port for name, port in ports.items() if name.startswith("metrics"))
    assert metrics_ports == [metrics_port + i for i in range(workers)]  # worker i: metrics port + i
    # The liveness probe must not be the health check: NOT_SERVING while the database is down would restart
    # pods and lose the caches that keep verified keys authorized meanwhile.
    assert "grpc" not in container["livenessProbe"]
    assert pod["terminationGracePeriodSeconds"] > settings.drain_delay + settings.shutdown_grace
