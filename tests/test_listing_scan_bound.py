"""A List page examines a bounded number of rows (AIP-158: page_size is a maximum).

Terms no index serves (`labels.` for ListApiKeys; kind, actor_key_id and event_time for
ListAuditEvents) are checked row by row, so a page stops after listing.max_rows_examined(page_size) rows
even when it is not full, and its next_page_token resumes after the last row examined: a page may be short
or empty and still have a token. Following the tokens to the end must give exactly the matching rows, in
order, once each. The accounts here are filled straight into the database (far more rows than the bound,
without an argon2 hash each) and read through the server, on SQLite and PostgreSQL.
"""

import math
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import insert

from apikeyd.domain.listing import (
    decode_event_page_token,
    decode_page_token,
    max_rows_examined,
)
from apikeyd.domain.model import KeyState
from apikeyd.store.engine import create_db_engine
from apikeyd.store.models import ApiKeyRow, KeyEventRow
from apikeyd.v1 import api_keys_pb2 as pb
from tests.conftest import count_keys, create_key
from tests.test_cli import as_json, cli, ok
from tests.test_listing_plan import key_row

KEYS = 2500  # more than the bound for any page size up to 100 (max_rows_examined(100) == 1000)
EVENTS = 2500
START = datetime(2026, 1, 1, tzinfo=UTC)
RARE = 'labels.env = "rare"'  # every 300th key
CLUSTER = 'labels.team = "core"'  # 150 keys in a row, in the middle
NOWHERE = 'labels.env = "nowhere"'


def _labels(i: int) -> dict[str, str]:
    labels = {}
    if i % 300 == 5:
        labels["env"] = "rare"
    if 1200 <= i < 1350:
        labels["team"] = "core"
    return labels


def _key_row(account: str, i: int) -> dict[str, Any]:
    return key_row(
        account,
        START + timedelta(seconds=i // 2),  # pairs share a create_time: key_id breaks the tie
        display_name=f"key {i}",
        labels=_labels(i),
        state=KeyState.DISABLED.value if i % 7 == 5 else KeyState.ACTIVE.value,
    )


def _event_row(account: str, i: int) -> dict[str, Any]:
    return {
        "key_id": str(uuid.uuid4()),
        "account_id": account,
        "project_id": "",
        "kind": "revoked" if i == 1234 else "updated",
        "time": START + timedelta(seconds=i),
        "changed_fields": ["display_name"],
        "details": {},
        "actor_key_id": "rare-actor" if i % 400 == 9 else "",
        "actor_name": "",
        "actor_display_name": "",
        "peer": "",
        "method": "UpdateApiKey",
    }


@pytest.fixture(scope="module")
def big_account(database_url: str) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """An account of KEYS keys and EVENTS audit events; its keys in listing order."""
    account = f"acct-{uuid.uuid4().hex[:10]}"
    keys = [_key_row(account, i) for i in range(KEYS)]
    engine = create_db_engine(database_url)
    try:
        with engine.begin() as connection:
            connection.execute(insert(ApiKeyRow.__table__), keys)
            connection.execute(insert(KeyEventRow.__table__), [_event_row(account, i) for i in range(EVENTS)])
    finally:
        engine.dispose()
    yield account, sorted(keys, key=lambda row: (row["create_time"], row["key_id"]))


def _walk(stub: Any, account: str, filter_text: str, page_size: int) -> list[pb.ListApiKeysResponse]:
    """Every page of a listing, following next_page_token (not the pages' contents) to the end."""
    pages, token = [], ""
    for _ in range(10_000):
        page = stub.ListApiKeys(
            pb.ListApiKeysRequest(
                parent=f"accounts/{account}", filter=filter_text, page_size=page_size, page_token=token
            )
        )
        assert len(page.api_keys) <= page_size
        pages.append(page)
        token = page.next_page_token
        if not token:
            return pages
    raise AssertionError("no end after 10000 pages")


def _matches(row: dict[str, Any], filter_text: str) -> bool:
    wanted = {
        RARE: {"env": "rare"},
        CLUSTER: {"team": "core"},
        NOWHERE: {"env": "nowhere"},
        f"{RARE} AND {CLUSTER}": {"env": "rare", "team": "core"},
        f"state = DISABLED AND {CLUSTER}": {"team": "core"},
    }[filter_text]
    if filter_text.startswith("state = DISABLED") and row["state"] != KeyState.DISABLED.value:
        return False
    return all(row["labels"].get(label) == value for label, value in wanted.items())


def test_a_label_matching_nothing_gives_empty_pages_with_tokens_to_the_end(stub, big_account):
    account, _ = big_account
    pages = _walk(stub, account, NOWHERE, 10)
    bound = max_rows_examined(10)
    assert bound == 1000
    assert not pages[0].api_keys and pages[0].next_page_token  # empty, and more may follow
    assert all(not page.api_keys for page in pages)
    assert len(pages) == math.ceil(KEYS / bound)  # each page walked `bound` keys, the last the rest
    assert count_keys(stub, account, filter=NOWHERE) == 0  # conftest's helper follows tokens through them


def _token_key(server) -> bytes:
    """The server's page-token key (from its database), to read the position inside its tokens."""
    return server.run(server.app.manager.page_token_key())


def test_a_token_cut_by_the_bound_resumes_after_the_last_key_examined(server, stub, big_account):
    """The bound itself: the token of an empty page is positioned at the bound-th key the walk examined,
    then at twice that; it fails if the bound is removed (the first page would walk to the end) or changed."""
    account, keys = big_account
    for page_size in (10, 100):
        pages = _walk(stub, account, NOWHERE, page_size)
        bound = max_rows_examined(page_size)
        assert bound == 1000 and len(pages) == 3
        for number, page in enumerate(pages[:-1], start=1):
            after = decode_page_token(_token_key(server), page.next_page_token, account, NOWHERE)
            last = keys[number * bound - 1]
            assert after == (last["create_time"], last["key_id"])
            # nothing beyond what the caller may list anyway: a key of this account it can read
            assert stub.GetApiKey(pb.GetApiKeyRequest(name=f"accounts/{account}/apiKeys/{after[1]}")).key_id == after[1]


@pytest.mark.parametrize("page_size", [1, 3, 50, 100, 1000])
@pytest.mark.parametrize("filter_text", [RARE, CLUSTER, f"{RARE} AND {CLUSTER}", f"state = DISABLED AND {CLUSTER}"])
def test_following_the_tokens_gives_exactly_the_matching_keys_in_order(stub, big_account, filter_text, page_size):
    account, keys = big_account
    expected = [row["key_id"] for row in keys if _matches(row, filter_text)]
    assert expected  # every filter here matches something
    pages = _walk(stub, account, filter_text, page_size)
    listed = [key.key_id for page in pages for key in page.api_keys]
    assert listed == expected  # in order, no duplicate, no gap
    # a walk never needs more calls than the bound's share of the account plus the full pages
    assert len(pages) <= math.ceil(KEYS / max_rows_examined(page_size)) + math.ceil(len(expected) / page_size) + 1


def test_the_command_line_follows_tokens_through_empty_pages(server, big_account):
    account, keys = big_account
    listed = as_json(
        cli(server, "keys", "list", "--account", account, "--filter", RARE, "--page-size", "2", "--all", "--json")
    )
    assert [key["key_id"] for key in listed["api_keys"]] == [row["key_id"] for row in keys if _matches(row, RARE)]
    assert listed["next_page_token"] == ""
    one = ok(cli(server, "keys", "list", "--account", account, "--filter", NOWHERE, "--page-size", "5"))
    assert not one.stdout.strip()
    assert f"0 keys shown from accounts/{account}; more follow" in one.stderr, one.stderr


# --- ListAuditEvents ------------------------------------------------------------------------------


def _walk_events(stub: Any, account: str, filter_text: str, page_size: int) -> list[pb.ListAuditEventsResponse]:
    pages, token = [], ""
    for _ in range(10_000):
        page = stub.ListAuditEvents(
            pb.ListAuditEventsRequest(
                parent=f"accounts/{account}", filter=filter_text, page_size=page_size, page_token=token
            )
        )
        assert len(page.audit_events) <= page_size
        pages.append(page)
        token = page.next_page_token
        if not token:
            return pages
    raise AssertionError("no end after 10000 pages")


def _events(stub: Any, account: str) -> list[pb.AuditEvent]:
    """The account's whole log, newest first, with no term checked row by row: full pages."""
    return [event for page in _walk_events(stub, account, "", 1000) for event in page.audit_events]


def test_an_event_filter_checked_row_by_row_is_bounded_too(server, stub, big_account):
    account, _ = big_account
    everything = _events(stub, account)
    assert len(everything) == EVENTS
    pages = _walk_events(stub, account, "kind = REVOKED", 10)
    bound = max_rows_examined(10)
    assert bound == 1000
    assert not pages[0].audit_events and pages[0].next_page_token
    assert len(pages) == math.ceil(EVENTS / bound)
    # the token of a page cut by the bound is below the last event examined, the bound-th newest
    assert (
        decode_event_page_token(_token_key(server), pages[0].next_page_token, account, "kind = REVOKED")
        == everything[bound - 1].event_id
    )
    revoked = [event for page in pages for event in page.audit_events]
    assert revoked == [event for event in everything if event.kind == pb.AuditEvent.REVOKED]
    assert len(revoked) == 1


@pytest.mark.parametrize("page_size", [1, 2, 100])
@pytest.mark.parametrize(
    "filter_text",
    ['actor_key_id = "rare-actor"', f'kind = UPDATED AND event_time < "{(START + timedelta(seconds=40)).isoformat()}"'],
)
def test_following_event_tokens_gives_exactly_the_matching_events_newest_first(
    stub, big_account, filter_text, page_size
):
    account, _ = big_account
    everything = _events(stub, account)
    if filter_text.startswith("actor_key_id"):
        expected = [event for event in everything if event.actor_key_id == "rare-actor"]
    else:
        expected = [event for event in everything if event.event_time.ToDatetime(UTC) < START + timedelta(seconds=40)]
    assert expected
    walked = [event for page in _walk_events(stub, account, filter_text, page_size) for event in page.audit_events]
    assert walked == expected


def test_a_project_key_reads_its_projects_events_through_their_index(server, stub, account, database_url):
    """A project key's project is served by the (account, project, id) index (migration 0004): among
    thousands of other events of its account it gets its own in one page, and nothing of another project's
    (not even an event id in a page token)."""
    engine = create_db_engine(database_url)
    try:
        with engine.begin() as connection:
            connection.execute(insert(KeyEventRow.__table__), [_event_row(account, i) for i in range(EVENTS)])
    finally:
        engine.dispose()
    reader = create_key(stub, account, scopes=("apikeys:read",), project_id="p1")
    as_reader = server.stub_for(reader.secret)
    pages = _walk_events(as_reader, account, "", 10)
    walked = [event for page in pages for event in page.audit_events]
    assert [(event.kind, event.key_id) for event in walked] == [(pb.AuditEvent.CREATED, reader.api_key.key_id)]
    assert len(pages) == 1 and not pages[0].next_page_token  # 2501 events in the account: no walk through them
