"""Resource names and the rules for the values a caller may set on a key."""

import json
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from apikeyd.domain.errors import InvalidArgument
from apikeyd.domain.model import (
    MAX_LIMIT_TIMES_PERIOD,
    ApiKey,
    KeyState,
    RateLimit,
    key_name,
    parse_key_name,
    parse_parent,
    validate_description,
    validate_display_name,
    validate_expire_time,
    validate_grace,
    validate_labels,
    validate_project_id,
    validate_rate_limits,
    validate_reason,
)

ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}", fullmatch=True)
label_keys = st.from_regex(r"[a-z][a-z0-9_-]{0,62}", fullmatch=True)
label_values = st.from_regex(r"[a-z0-9_-]{0,63}", fullmatch=True)
KEY_ID = "0f8fad5b-d9cb-469f-a165-70867728950e"


@contextmanager
def raises_invalid(field: str) -> Iterator[None]:
    """Expect InvalidArgument naming this field."""
    with pytest.raises(InvalidArgument) as caught:
        yield
    assert caught.value.field == field


# --- resource names -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("parent", "account_id"),
    [("accounts/acme", "acme"), ("accounts/A1.b_c-d", "A1.b_c-d"), ("accounts/7", "7"), ("accounts/" + "a" * 63, "a" * 63)],
)
def test_parse_parent_accepts_valid_names(parent: str, account_id: str) -> None:
    assert parse_parent(parent) == account_id


@pytest.mark.parametrize(
    "parent",
    [
        "",
        "accounts",
        "accounts/",
        "accounts/-acme",
        "accounts/.acme",
        "accounts/_acme",
        "accounts/ac me",
        "accounts/acme/",
        "accounts/acme/apiKeys",
        "/accounts/acme",
        "account/acme",
        "Accounts/acme",
        "accounts/acme\n",
        "accounts/" + "a" * 64,
        "accounts/ácme",
    ],
)
def test_parse_parent_rejects_bad_names_naming_the_field(parent: str) -> None:
    with raises_invalid("parent"):
        parse_parent(parent)
    with raises_invalid("api_key.parent"):
        parse_parent(parent, field="api_key.parent")


def test_parse_parent_message_names_the_bad_value() -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse_parent("orgs/acme")
    assert "orgs/acme" in str(caught.value)


@settings(max_examples=200, deadline=None)
@given(ids, st.uuids())
def test_key_name_round_trips(account_id: str, key_uuid: uuid.UUID) -> None:
    name = key_name(account_id, str(key_uuid))
    assert parse_key_name(name) == (account_id, str(key_uuid))
    assert parse_parent(f"accounts/{account_id}") == account_id


@pytest.mark.parametrize(
    "name",
    [
        "",
        f"accounts/acme/apiKeys/{KEY_ID.upper()}",  # key ids are lower-case UUIDs
        f"accounts/acme/apikeys/{KEY_ID}",
        f"accounts/acme/keys/{KEY_ID}",
        f"accounts/acme/apiKeys/{KEY_ID}/",
        f"accounts/acme/apiKeys/{KEY_ID}x",
        f"accounts/acme/apiKeys/{KEY_ID.replace('-', '')}",
        f"accounts/-acme/apiKeys/{KEY_ID}",
        f"accounts//apiKeys/{KEY_ID}",
        "accounts/acme/apiKeys/",
        "accounts/acme/apiKeys/not-a-uuid",
        f"/accounts/acme/apiKeys/{KEY_ID}",
        f"accounts/acme/apiKeys/{KEY_ID}\n",
        "accounts/acme",
    ],
)
def test_parse_key_name_rejects_bad_names_naming_the_field(name: str) -> None:
    with raises_invalid("name"):
        parse_key_name(name)
    with raises_invalid("api_key.name"):
        parse_key_name(name, field="api_key.name")


def test_parse_key_name_accepts_a_valid_name() -> None:
    assert parse_key_name(f"accounts/acme/apiKeys/{KEY_ID}") == ("acme", KEY_ID)


@pytest.mark.parametrize("project_id", ["", "p1", "P.1_x-y", "a" * 63])
def test_validate_project_id_accepts(project_id: str) -> None:
    assert validate_project_id(project_id) == project_id


@pytest.mark.parametrize("project_id", ["-p", "p 1", "a" * 64, "p/1"])
def test_validate_project_id_rejects(project_id: str) -> None:
    with raises_invalid("project_id"):
        validate_project_id(project_id)


# --- labels -------------------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(label_keys, label_values, max_size=64))
def test_valid_labels_are_accepted_and_kept(labels: dict[str, str]) -> None:
    assert validate_labels(labels) == labels


def test_sixty_four_labels_are_accepted_sixty_five_are_not() -> None:
    labels = {f"k{i}": "v" for i in range(64)}
    assert validate_labels(labels) == labels
    labels["k64"] = "v"
    with raises_invalid("labels"):
        validate_labels(labels)


@pytest.mark.parametrize(
    "labels",
    [
        {"": "v"},
        {"Env": "prod"},
        {"1env": "prod"},
        {"-env": "prod"},
        {"e.nv": "prod"},
        {"e nv": "prod"},
        {"e" * 64: "prod"},
        {"env": "Prod"},
        {"env": "pr od"},
        {"env": "pr.od"},
        {"env": "p" * 64},
        {"env": "prod\n"},
        {"ok": "fine", "Bad": "x"},
    ],
)
def test_invalid_labels_are_rejected(labels: dict[str, str]) -> None:
    with raises_invalid("labels"):
        validate_labels(labels)


def test_label_boundaries() -> None:
    labels = {"e" * 63: "v" * 63, "empty": "", "a": "0", "with_under-dash": "x_y-z"}
    assert validate_labels(labels) == labels


# --- display name, description ------------------------------------------------------------------


@given(st.text(st.characters(exclude_categories=("Cc",)), min_size=1, max_size=255))
@settings(max_examples=100, deadline=None)
def test_display_name_of_1_to_255_characters_is_accepted(name: str) -> None:
    assert validate_display_name(name) == name


@pytest.mark.parametrize("character", [chr(code) for code in range(0x20)] + ["\x7f"])
def test_control_characters_are_refused_in_names_and_free_text(character: str) -> None:
    """PostgreSQL refuses NUL where SQLite stores it: both backends must answer alike, so the domain refuses."""
    with pytest.raises(InvalidArgument) as caught:
        validate_display_name(f"a{character}b")
    assert caught.value.field == "display_name" and f"U+{ord(character):04X}" in str(caught.value)
    if character in "\t\n\r":
        assert validate_description(f"a{character}b") == f"a{character}b"
        assert validate_reason(f"a{character}b") == f"a{character}b"
    else:
        with pytest.raises(InvalidArgument, match=r"^description: "):
            validate_description(f"a{character}b")
        with pytest.raises(InvalidArgument, match=r"^reason: "):
            validate_reason(f"a{character}b")


@pytest.mark.parametrize("name", ["", "x" * 256, "é" * 256])
def test_display_name_empty_or_too_long_is_rejected(name: str) -> None:
    with raises_invalid("display_name"):
        validate_display_name(name)


def test_description_up_to_1024_characters() -> None:
    assert validate_description("") == ""
    assert validate_description("d" * 1024) == "d" * 1024
    with raises_invalid("description"):
        validate_description("d" * 1025)


# --- rate limits --------------------------------------------------------------------------------

valid_rate_limits = st.integers(1, 86_400).flatmap(
    lambda period: st.builds(RateLimit, st.integers(1, MAX_LIMIT_TIMES_PERIOD // period), st.just(period))
)


@settings(max_examples=200, deadline=None)
@given(st.lists(valid_rate_limits, max_size=8))
def test_valid_rate_limits_are_accepted(limits: list[RateLimit]) -> None:
    result = validate_rate_limits(limits)
    assert set(result) == set(limits)
    assert len(result) == len(set(limits))


@pytest.mark.parametrize(
    "limit",
    [RateLimit(0, 60), RateLimit(-1, 60), RateLimit(10, 0), RateLimit(10, -1), RateLimit(10, 86_401)],
)
def test_rate_limit_out_of_range_is_rejected(limit: RateLimit) -> None:
    with raises_invalid("rate_limits"):
        validate_rate_limits([RateLimit(5, 1), limit])


def test_rate_limit_boundaries_are_accepted() -> None:
    limits = [RateLimit(1, 1), RateLimit(1, 86_400)]
    assert set(validate_rate_limits(limits)) == set(limits)


def test_at_most_eight_rate_limits() -> None:
    eight = [RateLimit(i, 60) for i in range(1, 9)]
    assert len(validate_rate_limits(eight)) == 8
    with raises_invalid("rate_limits"):
        validate_rate_limits([RateLimit(i, 60) for i in range(1, 10)])


# --- grace period, expire time ------------------------------------------------------------------


@pytest.mark.parametrize(
    "grace", [timedelta(0), timedelta(seconds=1), timedelta(hours=1), timedelta(days=7)]
)
def test_grace_from_zero_to_seven_days_is_accepted(grace: timedelta) -> None:
    assert validate_grace(grace) == grace


@pytest.mark.parametrize(
    "grace", [timedelta(seconds=-1), timedelta(microseconds=-1), timedelta(days=7, microseconds=1), timedelta(days=8)]
)
def test_grace_outside_zero_to_seven_days_is_rejected(grace: timedelta) -> None:
    with raises_invalid("grace_period"):
        validate_grace(grace)


NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    "expire", [None, NOW + timedelta(microseconds=1), NOW + timedelta(days=365), datetime(2025, 6, 1, 14, 0, 1, tzinfo=timezone(timedelta(hours=2)))]
)
def test_expire_time_in_the_future_or_none_is_accepted(expire: datetime | None) -> None:
    assert validate_expire_time(expire, NOW) == expire


@pytest.mark.parametrize(
    "expire",
    [NOW, NOW - timedelta(microseconds=1), NOW - timedelta(days=1), datetime(2025, 6, 1, 13, 0, tzinfo=timezone(timedelta(hours=2)))],
)
def test_expire_time_now_or_in_the_past_is_rejected(expire: datetime) -> None:
    with raises_invalid("expire_time"):
        validate_expire_time(expire, NOW)


# --- what the verified-key cache keeps of a key ---------------------------------------------------------


def _as_stored(key_id: str, scopes: list[str], labels: dict[str, str]) -> ApiKey:
    """A key with strings, tuple and dict of its own, as the store hands out one per row."""
    row = json.loads(json.dumps({"account": "acct-1", "project": "web", "scopes": scopes, "labels": labels}))
    now = datetime.now(UTC)
    return ApiKey(
        key_id=key_id, account_id=row["account"], project_id=row["project"], display_name=f"key {key_id}",
        description="a description", scopes=tuple(row["scopes"]), labels=row["labels"], state=KeyState.ACTIVE,
        prefix="AKP_", lookup_id=f"lookup{key_id}", masked_key="AKP_...", expire_time=now + timedelta(days=1),
        rate_limits=(RateLimit(10, 60),), create_time=now, update_time=now, revision=3, revoke_time=None,
    )


def test_a_verified_key_says_what_its_key_says_and_shares_what_other_keys_repeat() -> None:
    scopes, labels = ["messages:send:{a.example.com}", "messages:read"], {"env": "prod", "team": "mail"}
    first, second = _as_stored("k1", scopes, labels), _as_stored("k2", scopes, labels)
    assert first.account_id is not second.account_id and first.scopes is not second.scopes
    one, two = first.verified(), second.verified()
    assert (one.key_id, one.name, one.display_name, one.state, one.rate_limits) == (
        "k1", first.name, "key k1", KeyState.ACTIVE, (RateLimit(10, 60),)
    )
    assert (one.scopes, one.labels) == (first.scopes, first.labels)
    assert one.account_id is two.account_id and one.project_id is two.project_id
    assert one.scopes is two.scopes and one.labels is two.labels
    many = [f"scope{i}:read" for i in range(9)]  # more than are shared: equal, each its own
    three, four = _as_stored("k3", many, labels).verified(), _as_stored("k4", many, labels).verified()
    assert three.scopes == four.scopes == tuple(many) and three.scopes is not four.scopes
