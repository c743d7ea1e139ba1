"""The README's five-minute tour, run as a reader would run it: its terminal-2 block, word for word, in
bash against a fresh `apikeyd serve`, so the page and the commands cannot drift apart."""

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import APIKEYD, ServeProcess, free_port, wait_for

README = Path(__file__).resolve().parent.parent / "README.md"
MARKER = "<!-- tour: tests/test_readme_tour.py runs this block against a fresh server -->"


def _tour() -> str:
    text = README.read_text()
    match = re.search(re.escape(MARKER) + r"\n```sh\n(.*?)\n```", text, re.S)
    assert match is not None, "the README's tour block is gone, or its marker"
    return match.group(1)


def test_the_readme_tour_runs_as_written(tmp_path):
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("APIKEYD_")},
        "APIKEYD_ADDRESS": f"127.0.0.1:{port}",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    # As `make run` does, in the directory the reader works in: the database is ./apikeyd.db.
    subprocess.run([APIKEYD, "migrate"], cwd=tmp_path, env=env, check=True, capture_output=True, timeout=60)
    server = ServeProcess(
        ["--listen", f"127.0.0.1:{port}", "--database-url", f"sqlite:///{tmp_path}/apikeyd.db",
         "--metrics-listen", "127.0.0.1:0", "--ext-authz-listen", f"127.0.0.1:{free_port()}"],
        env,
    )  # fmt: skip
    try:
        health = [APIKEYD, "health", "--address", f"127.0.0.1:{port}"]
        wait_for(lambda: subprocess.run(health, env=env, capture_output=True).returncode == 0, "the server", 60)
        tour = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", _tour()], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
        )
        assert tour.returncode == 0, (tour.stdout, tour.stderr)
        assert "denied, as it should be" in tour.stdout and "revoked: refused" in tour.stdout
        assert "INSUFFICIENT_SCOPE" in tour.stdout and "REVOKED" in tour.stdout
    finally:
        assert server.stop() == 0, server.stderr
