"""What every harness shares: the contract (a parser returns, or raises one of the errors it documents,
nothing else) and the entry point atheris runs.

A harness module defines `check(data: bytes)` and ends with `if __name__ == "__main__": main(check)`;
`make fuzz` runs each one for its share of FUZZ_SECONDS (fuzz/run.py). Anything `check` raises other than
what it catches is a finding: atheris prints the input and stops with a non-zero exit.
"""

import sys
from collections.abc import Callable

import atheris


def main(check: Callable[[bytes], None]) -> None:
    atheris.Setup(sys.argv, check)
    atheris.Fuzz()
