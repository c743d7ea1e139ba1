"""`make fuzz`: every harness in this directory, each for an equal share of FUZZ_SECONDS (argv[1]).

Each runs in a process of its own (atheris instruments at import and exits on a finding); the first that
fails stops the run with its exit code, after its finding has been printed.
"""

import subprocess
import sys
from pathlib import Path


def main() -> int:
    total = float(sys.argv[1]) if len(sys.argv) > 1 else 60.0
    harnesses = sorted(Path(__file__).parent.glob("fuzz_*.py"))
    artifacts = Path(__file__).parent.parent / ".venv" / "fuzz-findings"  # the inputs that failed, if any
    artifacts.mkdir(parents=True, exist_ok=True)
    share = max(1, int(total / len(harnesses)))
    for harness in harnesses:
        print(f"fuzz: {harness.stem} for {share} s", flush=True)
        run = subprocess.run(
            [sys.executable, "-m", f"fuzz.{harness.stem}", f"-max_total_time={share}", "-timeout=10",
             "-rss_limit_mb=2048", f"-artifact_prefix={artifacts}/"],
        )  # fmt: skip
        if run.returncode != 0:
            print(f"fuzz: {harness.stem} found a failure (exit {run.returncode}); its input is in {artifacts}", flush=True)
            return run.returncode
    print(f"fuzz: {len(harnesses)} harnesses, no failure", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
