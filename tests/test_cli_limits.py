"""The CLI's flags for issue 12: credits and refills, allowed IP ranges, and the early end of a grace."""

import pytest

from tests.test_cli import as_json, cli, error_line, new_key, ok


def _key(server, account, *args: str) -> dict:
    return new_key(server, account, "--display-name", "metered", "--scope", "messages:send:all", *args)


def test_create_with_credits_a_refill_and_ranges_and_see_them(server, account):
    created = _key(
        server, account, "--credits", "100", "--refill", "1000/day", "--refill-mode", "add", "--refill-cap", "5000",
        "--allowed-ip", "203.0.113.0/24", "--allowed-ip", "2001:db8::/32",
    )  # fmt: skip
    key = created["api_key"]
    assert key["credits"]["remaining"] == "100"
    assert key["credits"]["refill"] == {"amount": "1000", "calendar": "DAILY", "mode": "ADD", "cap": "5000"}
    assert key["allowed_ip_ranges"] == ["203.0.113.0/24", "2001:db8::/32"]
    shown = ok(cli(server, "keys", "get", key["name"])).stdout
    assert "credits" in shown and "100 (refill 1000/day add up to 5000, next " in shown
    assert "203.0.113.0/24, 2001:db8::/32" in shown


def test_update_sets_the_balance_or_the_refill_or_both(server, account):
    name = _key(server, account)["api_key"]["name"]
    # No credits yet: --credits alone gives the key credits.
    assert as_json(cli(server, "keys", "update", name, "--credits", "10", "--json"))["credits"]["remaining"] == "10"
    refilled = as_json(cli(server, "keys", "update", name, "--refill", "500/12h", "--json"))
    assert refilled["credits"]["remaining"] == "10" and refilled["credits"]["refill"]["every"] == "43200s"
    topped = as_json(cli(server, "keys", "update", name, "--credits", "70", "--json"))
    assert topped["credits"]["remaining"] == "70" and topped["credits"]["refill"]["amount"] == "500", "the refill stays"
    cleared = as_json(cli(server, "keys", "update", name, "--clear-refill", "--json"))
    assert cleared["credits"] == {"remaining": "70"}
    assert "credits" not in as_json(cli(server, "keys", "update", name, "--clear-credits", "--json"))
    ranged = as_json(cli(server, "keys", "update", name, "--allowed-ip", "10.0.0.0/8", "--json"))
    assert ranged["allowed_ip_ranges"] == ["10.0.0.0/8"]
    assert as_json(cli(server, "keys", "update", name, "--clear-allowed-ips", "--json"))["allowed_ip_ranges"] == []


def test_rotate_with_an_early_end_of_grace(server, account):
    name = _key(server, account)["api_key"]["name"]
    result = ok(cli(server, "keys", "rotate", name, "--grace", "1d", "--end-grace-after-unused", "1h"))
    assert "grace ends early" in result.stderr and "after 1h unused" in result.stderr
    assert "previous secret used" in result.stderr


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (("--credits", "-1"), "--credits"),
        (("--refill", "lots"), "--refill"),
        (("--refill", "100/fortnight"), "--refill"),
        (("--credits", "5", "--refill-mode", "add"), "--refill-mode"),
        (("--refill", "5/day"), "--refill"),
        (("--credits", "5", "--refill", "5/day", "--refill-cap", "0"), "--refill-cap"),
    ],
)
def test_bad_credit_flags_are_usage_errors(server, account, args, option):
    result = cli(server, "keys", "create", "--account", account, "--display-name", "x", "--scope", "a:b", *args)
    assert result.exit_code == 2 and option in result.stderr, result.stderr


def test_the_servers_refusals_name_the_field(server, account):
    result = cli(
        server, "keys", "create", "--account", account, "--display-name", "x", "--scope", "a:b",
        "--allowed-ip", "10.0.0.1/8",
    )  # fmt: skip
    assert "allowed_ip_ranges" in error_line(result, "INVALID_ARGUMENT") and "did you mean 10.0.0.0/8" in result.stderr
    name = _key(server, account)["api_key"]["name"]
    result = cli(server, "keys", "rotate", name, "--grace", "1h", "--end-grace-after-unused", "2h")
    assert "end_grace_after_unused" in error_line(result, "INVALID_ARGUMENT")


def test_version():
    from importlib.metadata import version

    result = ok(cli(None, "--version"))
    assert result.stdout == f"apikeyd {version('apikeyd')}\n"


def _stderr_at_a_terminal(*args: str, **env_extra: str) -> tuple[int, str]:
    """`apikeyd ARGS` with stderr on a pseudo-terminal, as a person at a shell sees it; stdout is a pipe."""
    import os
    import pty
    import subprocess

    from tests.conftest import APIKEYD

    master, slave = pty.openpty()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("APIKEYD_")}, **env_extra}
    process = subprocess.Popen([APIKEYD, *args], stdout=subprocess.PIPE, stderr=slave, env=env)
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # the terminal closed with the process
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    assert process.stdout is not None
    process.stdout.read()
    return process.wait(timeout=60), b"".join(chunks).decode()


def test_admin_commands_at_a_terminal_print_their_outcome_not_log_lines(tmp_path):
    url = f"sqlite:///{tmp_path}/apikeyd.db"
    code, seen = _stderr_at_a_terminal("migrate", "--database-url", url)
    assert code == 0 and seen.strip().splitlines() == [f"database at {url} is up to date"], seen
    code, seen = _stderr_at_a_terminal("admin-key", "create", "--display-name", "ops", "--database-url", url)
    lines = seen.strip().splitlines()
    assert code == 0 and len(lines) == 1 and lines[0].startswith("created accounts/system/apiKeys/"), seen


def test_logs_are_text_at_a_terminal_and_json_otherwise(tmp_path):
    import subprocess

    from tests.conftest import APIKEYD

    url = f"sqlite:///{tmp_path}/apikeyd.db"
    code, seen = _stderr_at_a_terminal("migrate", "--database-url", url, APIKEYD_LOG_LEVEL="INFO")
    assert code == 0 and "{" not in seen and "INFO" in seen, seen
    piped = subprocess.run([APIKEYD, "migrate", "--database-url", url], capture_output=True, text=True, timeout=60)
    assert piped.returncode == 0 and piped.stderr.splitlines()[0].startswith("{"), piped.stderr


def test_authorize_takes_a_cost_and_a_client_ip_and_shows_the_credits_left(server, account):
    created = _key(server, account, "--credits", "5", "--allowed-ip", "192.0.2.0/24")
    secret = created["secret"]
    allowed = cli(server, "authorize", secret, "--cost", "3", "--client-ip", "192.0.2.9")
    assert allowed.exit_code == 0 and "credits" in allowed.stdout and "2 left" in allowed.stdout, allowed.stdout
    outside = cli(server, "authorize", secret, "--client-ip", "198.51.100.1")
    assert outside.exit_code == 1 and "IP_NOT_ALLOWED" in outside.stdout
    too_dear = cli(server, "authorize", secret, "--cost", "3", "--client-ip", "192.0.2.9")
    assert too_dear.exit_code == 1 and "CREDITS_EXHAUSTED" in too_dear.stdout and "2 left" in too_dear.stdout
    assert cli(server, "authorize", secret, "--cost", "-1").exit_code == 2
