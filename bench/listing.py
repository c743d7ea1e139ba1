"""The listing section of `make bench`: a page of ListApiKeys costs the same at 1,000 and at 1,000,000 keys in
one account, because it is read by keyset paging on an index (migration 0003) and nothing counts the matches.

On a fresh PostgreSQL database, migrated with the project's migrations, keys are written straight into the
table by one INSERT ... SELECT over generate_series (argon2 for a million keys would take more than an hour;
every row gets one fixed real argon2id hash, and every NOT NULL column a value the way the repository would
write it): account A holds SMALL keys and account B LARGE, created over the same year and interleaved in
the table as they would be, with 20% of each in project "web", some in other projects, some DISABLED and
some REVOKED. Then a real `apikeyd serve` on that database answers ListApiKeys over gRPC with page_size
PAGE_SIZE: the first page, and a page in the middle, reached by following page tokens from the start (pages
of the largest size, as any client could), each without and with a project filter. Each figure takes
CALLS sequential calls, in ROUNDS rounds that alternate between the accounts, so that noise hits both alike.
Most of a call's time is gRPC and protobuf in Python, so it also gives the database's own part: the SQL that
the repository sends for each page, under EXPLAIN ANALYZE (time and buffers touched). And for comparison, the
COUNT that `total_size` made on every page before it was removed.

Returns the lines to print, as (label, text), or a reason to skip. The database is dropped at the end.
Everything connects to 127.0.0.1 only.
"""

import secrets
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from sqlalchemy import event

from apikeyd.authorizer.hashing import SecretHasher
from apikeyd.domain.listing import MAX_PAGE_SIZE, decode_page_token, parse_filter
from apikeyd.store.repository import Repository
from apikeyd.v1 import api_keys_pb2 as pb
from apikeyd.v1 import api_keys_pb2_grpc as pb_grpc
from bench.scaleout import POSTGRES_ADMIN_URL, postgres_database, postgres_problem
from bench.server_process import ServerProcess, run_apikeyd, running_server

Lines = list[tuple[str, str]]

SMALL_ACCOUNT, LARGE_ACCOUNT = "bench-small", "bench-large"
SMALL, LARGE = 1_000, 1_000_000
PROJECT = "web"  # every 5th key of each account
PAGE_SIZE = 100
CALLS = 200  # per figure
ROUNDS = 4
WARMUP_CALLS = 10  # per figure and round, not counted
CALL_TIMEOUT = 60.0
EXPLAIN_RUNS = 21
LOAD_TIMEOUT = 600.0  # seconds for the INSERT; it takes 30 to 60 s on the 2-core development machine


@dataclass(frozen=True)
class _Case:
    label: str
    filter: str
    middle: bool


CASES = (
    _Case("first page", "", middle=False),
    _Case("middle page", "", middle=True),
    _Case("first page, project", f'project_id = "{PROJECT}"', middle=False),
    _Case("middle page, project", f'project_id = "{PROJECT}"', middle=True),
)

# One row per slot n of generate_series: every (LARGE / SMALL + 1)th slot is A's, the others B's, so that
# both accounts' keys are created over the same year and lie interleaved in the table, as real ones would.
# `ord` numbers the keys within their account; it decides the project and the state.
_LOAD = """
INSERT INTO api_keys (
    key_id, account_id, project_id, display_name, description, scopes, labels, state, prefix, lookup_id,
    masked_key, secret_hash, previous_secret_hash, previous_secret_expire_time, expire_time, rate_limits,
    create_time, update_time, last_used_time, revoke_time, revoke_reason, revision
)
SELECT
    gen_random_uuid()::text,
    account,
    project,
    'bench key ' || ord,
    '',
    '["messages:send:all", "domains:read"]'::json,
    json_build_object('env', CASE WHEN ord %% 3 = 0 THEN 'dev' ELSE 'prod' END),
    state,
    CASE WHEN project = '' THEN 'AK_' ELSE 'AKP_' END,
    lookup,
    CASE WHEN project = '' THEN 'AK_' ELSE 'AKP_' END || substr(lookup, 1, 8) || '...' || substr(lookup, 13, 4),
    %(secret_hash)s,
    NULL,
    NULL,
    CASE WHEN ord %% 4 = 0 THEN created + interval '400 days' END,
    CASE WHEN ord %% 10 = 0 THEN '[[100, 60]]'::json ELSE '[]'::json END,
    created,
    created,
    CASE WHEN ord %% 2 = 0 THEN created + interval '1 hour' END,
    CASE WHEN state = 'REVOKED' THEN created + interval '1 day' END,
    CASE WHEN state = 'REVOKED' THEN 'bench' ELSE '' END,
    CASE WHEN state = 'ACTIVE' THEN 1 ELSE 2 END
FROM (
    SELECT
        n, account, ord, created,
        substr(md5(%(salt)s || n::text), 1, 16) AS lookup,
        CASE WHEN ord %% 5 = 1 THEN %(project)s WHEN ord %% 5 = 2 THEN 'batch-' || (ord %% 37) ELSE '' END AS project,
        CASE WHEN ord %% 50 = 3 THEN 'DISABLED' WHEN ord %% 33 = 4 THEN 'REVOKED' ELSE 'ACTIVE' END AS state
    FROM (
        SELECT
            n,
            CASE WHEN n %% %(stride)s = %(stride)s / 2 THEN %(small)s ELSE %(large)s END AS account,
            CASE WHEN n %% %(stride)s = %(stride)s / 2 THEN n / %(stride)s ELSE n - n / %(stride)s END AS ord,
            now() - interval '365 days' + n * (interval '365 days' / %(slots)s) AS created
        FROM generate_series(0, %(slots)s - 1) AS n
    ) AS slots
) AS keys
"""


def _load(url: str) -> tuple[float, dict[str, tuple[int, int]]]:
    """Write the keys; the seconds it took (insert, VACUUM ANALYZE) and each account's (keys, project keys)."""
    import psycopg

    stride = LARGE // SMALL + 1
    slots = SMALL * stride
    if slots - SMALL != LARGE:
        raise ValueError("LARGE must be a multiple of SMALL")
    started = time.perf_counter()
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute(f"SET statement_timeout = '{LOAD_TIMEOUT:.0f}s'")
        connection.execute(
            _LOAD,
            {
                "secret_hash": SecretHasher().hash(secrets.token_urlsafe(24)),  # one real hash, for every row
                "salt": secrets.token_hex(8),
                "project": PROJECT,
                "stride": stride,
                "slots": slots,
                "small": SMALL_ACCOUNT,
                "large": LARGE_ACCOUNT,
            },
        )
        connection.execute("VACUUM (ANALYZE) api_keys")  # what autovacuum does to a table at rest
        counts = {
            account: (total, project)
            for account, total, project in connection.execute(
                "SELECT account_id, count(*), count(*) FILTER (WHERE project_id = %s) FROM api_keys GROUP BY account_id",
                (PROJECT,),
            )
        }
    return time.perf_counter() - started, counts


def _count_cost(url: str, account: str, filter_sql: str) -> float:
    """Median ms of the COUNT over an account that total_size needed on every page."""
    import psycopg

    times = []
    with psycopg.connect(url, autocommit=True) as connection:
        for _ in range(5):
            started = time.perf_counter()
            connection.execute(
                f"SELECT count(*) FROM api_keys WHERE account_id = %s{filter_sql}", (account,)
            ).fetchone()
            times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


class _Lister:
    def __init__(self, server: ServerProcess, channel: grpc.Channel) -> None:
        self._stub = pb_grpc.ApiKeyServiceStub(channel)
        self._metadata = server.credential

    def page(self, account: str, filter_text: str, page_size: int, token: str) -> pb.ListApiKeysResponse:
        return self._stub.ListApiKeys(
            pb.ListApiKeysRequest(
                parent=f"accounts/{account}", page_size=page_size, page_token=token, filter=filter_text
            ),
            timeout=CALL_TIMEOUT,
            metadata=self._metadata,
        )

    def token_after(self, account: str, filter_text: str, skip: int) -> tuple[str, int]:
        """The page token after the first `skip` matching keys, found by following tokens from the start in
        pages of the largest size, as any client could; and how many calls that took."""
        token, seen, calls = "", 0, 0
        while seen < skip:
            reply = self.page(account, filter_text, min(MAX_PAGE_SIZE, skip - seen), token)
            seen, token, calls = seen + len(reply.api_keys), reply.next_page_token, calls + 1
            if not token:
                raise RuntimeError(f"accounts/{account} ({filter_text!r}) ended after {seen} keys, before {skip}")
        return token, calls

    def time_calls(self, account: str, filter_text: str, token: str, calls: int) -> list[float]:
        for _ in range(WARMUP_CALLS):
            self.page(account, filter_text, PAGE_SIZE, token)
        times = []
        for _ in range(calls):
            started = time.perf_counter()
            reply = self.page(account, filter_text, PAGE_SIZE, token)
            times.append(time.perf_counter() - started)
            if len(reply.api_keys) != PAGE_SIZE:
                raise RuntimeError(f"accounts/{account}: a page of {len(reply.api_keys)} keys, not a full one")
        return times


def _database_reads(url: str, tokens: dict[tuple[str, _Case], str]) -> dict[tuple[str, _Case], tuple[float, int]]:
    """For each page, the SQL that Repository.list_keys sends, run under EXPLAIN (ANALYZE, BUFFERS) with the
    same parameters: the median execution time in the database, and the buffers the read touched."""
    repository = Repository.from_url(url, pool_size=1)
    sent: list[tuple[str, Any]] = []

    def capture(_conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, _many: bool) -> None:
        if statement.startswith("SELECT") and "FROM api_keys" in statement and "ORDER BY" in statement:
            sent.append((statement, parameters))

    event.listen(repository.engine, "before_cursor_execute", capture)
    reads: dict[tuple[str, _Case], tuple[float, int]] = {}
    token_key = repository.page_token_key()
    try:
        for (account, case), token in tokens.items():
            sent.clear()
            after = decode_page_token(token_key, token, account, case.filter) if token else None
            repository.list_keys(account, parse_filter(case.filter), PAGE_SIZE, after)
            statement, parameters = sent[-1]
            with repository.engine.connect() as connection:
                plans = [
                    connection.exec_driver_sql(
                        "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + statement, parameters
                    ).scalar_one()[0]
                    for _ in range(EXPLAIN_RUNS)
                ]
            top = plans[-1]["Plan"]
            reads[(account, case)] = (
                statistics.median(plan["Execution Time"] for plan in plans),
                top["Shared Hit Blocks"] + top["Shared Read Blocks"],
            )
    finally:
        event.remove(repository.engine, "before_cursor_execute", capture)
        repository.close()
    return reads


def _percentiles(times: list[float]) -> tuple[float, float]:
    cuts = statistics.quantiles(times, n=100, method="inclusive")
    return cuts[49] * 1e3, cuts[98] * 1e3


def listing_at_scale(workdir: Path) -> Lines:
    if problem := postgres_problem():
        return [("ListApiKeys 1k/1M", f"skipped: PostgreSQL ({POSTGRES_ADMIN_URL}) does not answer: {problem}")]
    lines: Lines = []
    accounts = (SMALL_ACCOUNT, LARGE_ACCOUNT)
    with postgres_database("apikeyd_bench_listing") as url:
        run_apikeyd("migrate", "--database-url", url)
        load_seconds, counts = _load(url)
        if counts.get(SMALL_ACCOUNT, (0, 0))[0] != SMALL or counts.get(LARGE_ACCOUNT, (0, 0))[0] != LARGE:
            raise RuntimeError(f"loaded {counts}, not {SMALL} and {LARGE} keys")
        lines.append(
            (
                "load",
                f"{SMALL:,} keys in account A, {LARGE:,} in account B (20% of each in project {PROJECT!r}): "
                f"{load_seconds:.1f} s for INSERT ... SELECT generate_series and VACUUM ANALYZE",
            )
        )
        counted = {
            (account, case_filter): _count_cost(url, account, sql)
            for account in accounts
            for case_filter, sql in (("", ""), ("project", f" AND project_id = '{PROJECT}'"))
        }
        with (
            running_server(workdir / "listing", url, name="listing") as server,
            grpc.insecure_channel(server.address) as channel,
        ):
            lister = _Lister(server, channel)
            tokens: dict[tuple[str, _Case], str] = {}
            follow_started, follow_calls = time.perf_counter(), 0
            for account in accounts:
                for case in CASES:
                    matching = counts[account][1] if case.filter else counts[account][0]
                    token, calls = lister.token_after(account, case.filter, matching // 2) if case.middle else ("", 0)
                    tokens[(account, case)] = token
                    follow_calls += calls
            follow_seconds = time.perf_counter() - follow_started
            times: dict[tuple[str, _Case], list[float]] = {key: [] for key in tokens}
            for round_number in range(ROUNDS):
                for account in accounts if round_number % 2 == 0 else accounts[::-1]:
                    for case in CASES:
                        times[(account, case)] += lister.time_calls(
                            account, case.filter, tokens[(account, case)], CALLS // ROUNDS
                        )
        reads = _database_reads(url, tokens)
    for case in CASES:
        small_p50, small_p99 = _percentiles(times[(SMALL_ACCOUNT, case)])
        large_p50, large_p99 = _percentiles(times[(LARGE_ACCOUNT, case)])
        (small_sql, small_buffers), (large_sql, large_buffers) = (
            reads[(SMALL_ACCOUNT, case)],
            reads[(LARGE_ACCOUNT, case)],
        )
        lines.append(
            (
                case.label,
                f"1k keys p50 {small_p50:.2f} ms p99 {small_p99:.2f} ms   1M keys p50 {large_p50:.2f} ms "
                f"p99 {large_p99:.2f} ms   1M/1k p50 x{large_p50 / small_p50:.2f} p99 x{large_p99 / small_p99:.2f}   "
                f"SQL {small_sql:.3f} -> {large_sql:.3f} ms, {small_buffers} -> {large_buffers} buffers",
            )
        )
    lines += [
        (
            "",
            f"ListApiKeys page_size {PAGE_SIZE} over gRPC to `apikeyd serve`, {CALLS // ROUNDS * ROUNDS} sequential "
            f"calls per figure in {ROUNDS} rounds alternating A and B; the middle page is after half of the "
            "matching keys",
        ),
        (
            "",
            f"SQL: the page's query as the repository sends it, under EXPLAIN ANALYZE (median of {EXPLAIN_RUNS}), "
            "1k -> 1M keys, and the buffers it touched (A's keys lie one per table page among B's)",
        ),
        (
            "reaching the middle",
            f"{follow_calls} ListApiKeys calls following page tokens in pages of {MAX_PAGE_SIZE}: "
            f"{follow_seconds:.1f} s for all four middles",
        ),
        (
            "COUNT (removed)",
            f"what total_size cost on every page: account 1k {counted[(SMALL_ACCOUNT, '')]:.2f} ms, "
            f"1M {counted[(LARGE_ACCOUNT, '')]:.1f} ms; project 1k {counted[(SMALL_ACCOUNT, 'project')]:.2f} ms, "
            f"1M {counted[(LARGE_ACCOUNT, 'project')]:.1f} ms (median of 5, SQL alone)",
        ),
        ("", "fresh PostgreSQL database, migrated by `apikeyd migrate`, dropped after"),
    ]
    return lines
