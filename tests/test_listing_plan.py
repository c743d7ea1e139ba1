"""ListApiKeys reads a page through an index, on both backends: the database's own plan for the query the
repository sends (EXPLAIN QUERY PLAN on SQLite, EXPLAIN on PostgreSQL) must start the page at its place in
the index of the filter's columns and must never sort the account's keys or scan the table.

The tables hold a few thousand keys in two accounts, one project and one state being rare, and have fresh
statistics (ANALYZE), so that the planner weighs real numbers: with the account index alone PostgreSQL
reads a project's keys with a sequential scan and a sort.
"""

import contextlib
import dataclasses
import json
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import pytest
from sqlalchemy import Engine, event, insert
from sqlalchemy.orm import Session

from apikeyd.domain.listing import EventFilter, Filter, max_rows_examined
from apikeyd.domain.model import ApiKey, KeyState
from apikeyd.store import migrate
from apikeyd.store.engine import create_db_engine
from apikeyd.store.models import ApiKeyRow, KeyEventRow
from apikeyd.store.repository import Repository
from tests.conftest import scratch_postgres_database

T = TypeVar("T")
ACCOUNT = "big"
KEYS = 5000  # in ACCOUNT; another account holds 3000
PAGE = 100
START = datetime(2026, 1, 1, tzinfo=UTC)


def key_row(account: str, created: datetime, **fields: Any) -> dict[str, Any]:
    """One api_keys row as the repository writes it (a fake hash: nothing here verifies), with `fields`
    replacing the defaults."""
    row = {
        "key_id": str(uuid.uuid4()),
        "account_id": account,
        "project_id": "",
        "display_name": "key",
        "description": "",
        "scopes": ["messages:send:all"],
        "labels": {},
        "state": KeyState.ACTIVE.value,
        "prefix": "AK_",
        "lookup_id": uuid.uuid4().hex[:16],
        "masked_key": "AK_xxxxxxxx...xxxx",
        "secret_hash": "$argon2id$v=19$m=8192,t=1,p=1$not-a-real-hash",
        "previous_secret_hash": None,
        "previous_secret_expire_time": None,
        "expire_time": None,
        "rate_limits": [],
        "create_time": created,
        "update_time": created,
        "last_used_time": None,
        "revoke_time": None,
        "revoke_reason": "",
        "revision": 1,
    }
    row.update(fields)
    return row


def _rows(account: str, count: int) -> list[dict[str, Any]]:
    """Keys; every 50th in project p1, every 40th DISABLED; pairs share a create_time: key_id breaks the tie."""
    return [
        key_row(
            account,
            START + timedelta(seconds=i // 2),
            display_name=f"key {i}",
            project_id="p1" if i % 50 == 7 else "",
            state=KeyState.DISABLED.value if i % 40 == 7 else KeyState.ACTIVE.value,
        )
        for i in range(count)
    ]


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    """A database of its own, migrated to the latest schema and filled; dropped afterwards."""
    with contextlib.ExitStack() as stack:
        if request.param == "sqlite":
            url = f"sqlite:///{tmp_path_factory.mktemp('plan') / 'apikeyd.db'}"
        else:
            _, url = stack.enter_context(scratch_postgres_database("apikeyd_plan"))
        engine = create_db_engine(url)
        stack.callback(engine.dispose)
        migrate.upgrade(engine)
        with engine.begin() as connection:
            connection.execute(insert(ApiKeyRow.__table__), _rows(ACCOUNT, KEYS))
            connection.execute(insert(ApiKeyRow.__table__), _rows("other", 3000))
        with engine.begin() as connection:
            connection.exec_driver_sql("ANALYZE")
        yield engine


@pytest.fixture(scope="module")
def everything(engine: Engine) -> list[ApiKey]:
    """The account's keys in listing order, read in pages of the largest size."""
    repository = Repository(engine)
    keys: list[ApiKey] = []
    after = None
    for _ in range(KEYS // 1000 + 2):
        page, after = repository.list_keys(ACCOUNT, Filter(), 1000, after)
        keys += page
        if after is None:
            break
    assert len(keys) == KEYS
    return keys


def _list_and_explain(
    engine: Engine, flt: Filter, after: tuple[datetime, str] | None
) -> tuple[list[ApiKey], str, dict[str, Any] | list[str]]:
    """One page through Repository.list_keys, the SQL it sent, and the database's plan for that SQL with
    the same parameters: PostgreSQL's plan tree, or SQLite's plan lines."""
    page, _, statement, parameters = _list_and_capture(engine, flt, after)
    with engine.connect() as connection:
        if engine.dialect.name == "sqlite":
            rows = connection.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, parameters).all()
            return page, statement, [row[-1] for row in rows]
        plan = connection.exec_driver_sql("EXPLAIN (FORMAT JSON) " + statement, parameters).scalar_one()
    plan = json.loads(plan) if isinstance(plan, str) else plan
    return page, statement, plan[0]["Plan"]


def _nodes(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield node
    for child in node.get("Plans", []):
        yield from _nodes(child)


def _matches(key: ApiKey, flt: Filter) -> bool:
    return (flt.state is None or key.state == flt.state) and (
        flt.project_id is None or key.project_id == flt.project_id
    )


CASES = [
    # (filter, the index that must serve it, the columns it must seek on besides account_id)
    pytest.param(Filter(), "ix_api_keys_account_page", (), id="account"),
    pytest.param(Filter(project_id="p1"), "ix_api_keys_project_page", ("project_id",), id="project"),
    pytest.param(Filter(state=KeyState.DISABLED), "ix_api_keys_state_page", ("state",), id="state"),
    pytest.param(
        Filter(state=KeyState.DISABLED, project_id="p1"),
        "ix_api_keys_project_state_page",
        ("project_id", "state"),
        id="project-and-state",
    ),
]


@pytest.mark.parametrize("deep", [False, True], ids=["first-page", "after-a-token"])
@pytest.mark.parametrize(("flt", "index", "columns"), CASES)
def test_a_page_is_read_through_the_filters_index_without_a_sort(
    engine: Engine, everything: list[ApiKey], flt: Filter, index: str, columns: tuple[str, ...], deep: bool
) -> None:
    matching = [key for key in everything if _matches(key, flt)]
    start = len(matching) // 2 if deep else 0
    after = (matching[start - 1].create_time, matching[start - 1].key_id) if deep else None
    page, _, plan = _list_and_explain(engine, flt, after)
    assert [key.key_id for key in page] == [key.key_id for key in matching[start : start + PAGE]]

    if isinstance(plan, list):  # SQLite
        text = "\n".join(plan)
        assert "TEMP B-TREE" not in text, text  # no sort of the matching rows
        assert "SCAN api_keys" not in text, text  # no walk over the whole table or a whole index
        seek = " AND ".join(["account_id=?", *(f"{column}=?" for column in columns)])
        if deep:
            seek += " AND (create_time,key_id)>(?,?)"
        assert f"SEARCH api_keys USING INDEX {index} ({seek})" in text, text
        return

    kinds = [node["Node Type"] for node in _nodes(plan)]
    assert not {"Sort", "Incremental Sort", "Seq Scan", "Bitmap Heap Scan"} & set(kinds), kinds
    scans = [node for node in _nodes(plan) if node["Node Type"] in ("Index Scan", "Index Only Scan")]
    assert len(scans) == 1 and scans[0]["Index Name"] == index, json.dumps(plan, indent=1)
    condition = scans[0]["Index Cond"]
    for column in ("account_id", *columns):
        assert f"({column})::text = " in condition, condition
    # The token's position is where the index scan starts, not a filter over the rows before it.
    assert ("ROW(create_time, (key_id)::text) >" in condition) == deep, condition
    assert "Filter" not in scans[0], scans[0]["Filter"]


@pytest.mark.parametrize(
    "flt", [Filter(state=KeyState.ACTIVE), Filter(project_id="")], ids=["active", "account-wide-keys"]
)
def test_a_common_value_still_pages_in_index_order(engine: Engine, everything: list[ApiKey], flt: Filter) -> None:
    """`state = ACTIVE` or `project_id = ""` match most keys here, so the planner may walk the account index
    in order and skip the few others rather than seek in the filter's index: as cheap for a page, but it
    must still start at the token's position and never sort."""
    matching = [key for key in everything if _matches(key, flt)]
    start = len(matching) // 2
    after = (matching[start - 1].create_time, matching[start - 1].key_id)
    page, _, plan = _list_and_explain(engine, flt, after)
    assert [key.key_id for key in page] == [key.key_id for key in matching[start : start + PAGE]]
    if isinstance(plan, list):
        text = "\n".join(plan)
        assert "TEMP B-TREE" not in text and "SCAN api_keys" not in text, text
        assert "SEARCH api_keys USING INDEX ix_api_keys_" in text and "(create_time,key_id)>(?,?)" in text, text
        return
    kinds = [node["Node Type"] for node in _nodes(plan)]
    assert not {"Sort", "Incremental Sort", "Seq Scan", "Bitmap Heap Scan"} & set(kinds), kinds
    scans = [node for node in _nodes(plan) if node["Node Type"] in ("Index Scan", "Index Only Scan")]
    assert len(scans) == 1 and scans[0]["Index Name"].startswith("ix_api_keys_"), scans
    assert "(account_id)::text = " in scans[0]["Index Cond"], scans
    assert "ROW(create_time, (key_id)::text) >" in scans[0]["Index Cond"], scans


@pytest.mark.parametrize(("flt", "index", "columns"), CASES)
def test_a_label_term_walks_at_most_the_bound_through_the_filters_index(
    engine: Engine, everything: list[ApiKey], flt: Filter, index: str, columns: tuple[str, ...]
) -> None:
    """Labels are checked key by key, so a `labels.` term walks the filter's index from the token's position
    and stops after max_rows_examined(PAGE) keys (and one more, to tell whether any follow): a label no key
    has gives an empty page after the bound-th key, not a walk over the whole account. On PostgreSQL the rows
    the index scan returned, as EXPLAIN ANALYZE counts them, are the bound and one."""
    labelled = dataclasses.replace(flt, labels=(("env", "nowhere"),))
    matching = [key for key in everything if _matches(key, flt)]
    bound = max_rows_examined(PAGE)
    assert bound == 1000
    assert len(matching) > bound or flt != Filter()  # the account's walk is cut by the bound
    page, resume, statement, parameters = _list_and_capture(engine, labelled, None)
    assert page == []
    if len(matching) > bound:
        assert resume == (matching[bound - 1].create_time, matching[bound - 1].key_id)
    else:
        assert resume is None  # the walk reached the end of the matching keys within the bound

    with engine.connect() as connection:
        if engine.dialect.name == "sqlite":
            plan = [row[-1] for row in connection.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, parameters)]
            text = "\n".join(plan)
            assert "SCAN api_keys" not in text, text
            assert f"SEARCH api_keys USING INDEX {index} (" in text, text
            return
        analyzed = connection.exec_driver_sql("EXPLAIN (ANALYZE, FORMAT JSON) " + statement, parameters).scalar_one()
    analyzed = json.loads(analyzed) if isinstance(analyzed, str) else analyzed
    nodes = list(_nodes(analyzed[0]["Plan"]))
    assert not {"Sort", "Incremental Sort", "Seq Scan", "Bitmap Heap Scan"} & {node["Node Type"] for node in nodes}
    scans = [node for node in nodes if node["Node Type"] in ("Index Scan", "Index Only Scan")]
    assert len(scans) == 1 and scans[0]["Index Name"] == index, json.dumps(analyzed, indent=1)
    assert scans[0]["Actual Rows"] == min(bound + 1, len(matching)), scans[0]


def _list_and_capture(
    engine: Engine, flt: Filter, after: tuple[datetime, str] | None
) -> tuple[list[ApiKey], tuple[datetime, str] | None, str, Any]:
    """One page through Repository.list_keys, where the next starts after, and the one statement it sent."""
    (page, resume), statement, parameters = _one_statement(
        engine, "FROM api_keys", lambda: Repository(engine).list_keys(ACCOUNT, flt, PAGE, after)
    )
    return page, resume, statement, parameters


def _one_statement(engine: Engine, needle: str, call: Callable[[], T]) -> tuple[T, str, Any]:
    """What `call` returns, and the one statement containing `needle` it sent, with its parameters."""
    sent: list[tuple[str, Any]] = []

    def capture(_conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, _many: bool) -> None:
        if needle in statement:
            sent.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", capture)
    try:
        result = call()
    finally:
        event.remove(engine, "before_cursor_execute", capture)
    assert len(sent) == 1, sent
    return result, *sent[0]


def _index_reads(engine: Engine, statement: str, parameters: Any) -> str | list[dict[str, Any]]:
    """SQLite: its plan text. PostgreSQL: the index nodes of the executed plan, with sequential scans off:
    on tables this small the planner may rightly prefer one; what a test asks is whether an index can serve
    the predicate, and how many rows it then reads."""
    with engine.connect() as connection:
        if engine.dialect.name == "sqlite":
            rows = connection.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, parameters).all()
            return " ".join(row[-1] for row in rows)
        connection.exec_driver_sql("SET enable_seqscan = off")
        tree = connection.exec_driver_sql("EXPLAIN (ANALYZE, FORMAT JSON) " + statement, parameters).scalar_one()
    tree = json.loads(tree) if isinstance(tree, str) else tree
    return [node for node in _nodes(tree[0]["Plan"]) if "Index" in node["Node Type"]]


def test_the_live_key_count_of_a_create_reads_only_live_keys(engine: Engine) -> None:
    """CreateApiKey counts the account's live keys (APIKEYD_MAX_KEYS_PER_ACCOUNT); revoked keys, kept for
    audit, pile up without bound and must not be read."""
    account = "mostly-revoked"
    rows = [
        key_row(account, START + timedelta(seconds=i), state=KeyState.REVOKED.value if i >= 10 else "ACTIVE")
        for i in range(3000)
    ]
    with engine.begin() as connection:
        connection.execute(insert(ApiKeyRow.__table__), rows)
        connection.exec_driver_sql("ANALYZE")

    def count() -> None:
        with Session(engine) as session:
            Repository._check_live_keys(session, account, 1000)

    _, statement, parameters = _one_statement(engine, "count(", count)
    reads = _index_reads(engine, statement, parameters)
    if isinstance(reads, str):
        assert "ix_api_keys_state_page (account_id=? AND state=?)" in reads, reads
    else:
        assert sum(node["Actual Rows"] * node.get("Actual Loops", 1) for node in reads) == 10, reads


def test_a_project_keys_audit_page_is_read_through_the_project_index(engine: Engine) -> None:
    """ListAuditEvents as a project key: the project is served by ix_key_events_project (migration 0004),
    not checked row by row along the account's whole log."""
    account = "audited"
    rows = [
        {
            "key_id": str(uuid.uuid4()), "account_id": account, "project_id": "p1" if i % 100 == 0 else "",
            "kind": "updated", "time": START + timedelta(seconds=i), "changed_fields": [], "details": {},
            "actor_key_id": "", "actor_name": "", "actor_display_name": "", "peer": "", "method": "UpdateApiKey",
        }
        for i in range(3000)
    ]
    with engine.begin() as connection:
        connection.execute(insert(KeyEventRow.__table__), rows)
        connection.exec_driver_sql("ANALYZE")
    (page, _), statement, parameters = _one_statement(
        engine, "FROM key_events", lambda: Repository(engine).list_events(account, "p1", EventFilter(), PAGE, None)
    )
    assert len(page) == 30 and {e.project_id for e in page} == {"p1"}
    reads = _index_reads(engine, statement, parameters)
    if isinstance(reads, str):
        assert "ix_key_events_project (account_id=? AND project_id=?)" in reads, reads
    else:
        assert [node["Index Name"] for node in reads] == ["ix_key_events_project"], reads
        assert reads[0]["Actual Rows"] == 30
