"""List filters, page tokens bound to their request, and page sizes."""

import base64
import json
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from apikeyd.domain.errors import InvalidArgument
from apikeyd.domain.listing import (
    DEFAULT_PAGE_SIZE,
    MAX_PAGE_SIZE,
    Filter,
    decode_event_page_token,
    decode_page_token,
    encode_event_page_token,
    encode_page_token,
    parse_filter,
    validate_page_size,
)
from apikeyd.domain.model import KeyState

KEY = bytes(range(32))  # the page-token key of these tests; a server reads its own from the database

ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}", fullmatch=True)
label_keys = st.from_regex(r"[a-z][a-z0-9_-]{0,62}", fullmatch=True)
bare_values = st.from_regex(r"[A-Za-z0-9._-]{1,20}", fullmatch=True)
gaps = st.text(alphabet=" \t\n", max_size=3)  # optional whitespace
spaces = st.text(alphabet=" \t\n", min_size=1, max_size=3)  # required whitespace


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


# --- parse_filter: accepted ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", Filter()),
        ("   \t\n ", Filter()),
        ("state = ACTIVE", Filter(state=KeyState.ACTIVE)),
        ("state=DISABLED", Filter(state=KeyState.DISABLED)),
        ('state = "REVOKED"', Filter(state=KeyState.REVOKED)),
        ('project_id = "p1"', Filter(project_id="p1")),
        ("project_id = p1", Filter(project_id="p1")),
        ('labels.env = "prod"', Filter(labels=(("env", "prod"),))),
        ("labels.env = prod", Filter(labels=(("env", "prod"),))),
        ('labels.note = "two words, \\"quoted\\" and \\\\"', Filter(labels=(("note", 'two words, "quoted" and \\'),))),
        (
            'state = ACTIVE AND project_id = "p1" AND labels.env = "prod"',
            Filter(KeyState.ACTIVE, "p1", (("env", "prod"),)),
        ),
        (
            '  labels.team="core"   AND\tstate   =  DISABLED\nAND labels.env = prod  ',
            Filter(state=KeyState.DISABLED, labels=(("env", "prod"), ("team", "core"))),
        ),
        ('project_id="a.b_c-9"AND state=ACTIVE', Filter(KeyState.ACTIVE, "a.b_c-9")),
    ],
)
def test_parse_filter_accepts(text: str, expected: Filter) -> None:
    assert parse_filter(text) == expected


@st.composite
def filters(draw: st.DrawFn) -> tuple[str, Filter]:
    """A filter text drawn from the grammar, and the Filter it must parse to."""
    terms: list[tuple[str, bool]] = []  # (term text, ends in a bare value)
    state = draw(st.none() | st.sampled_from(list(KeyState)))
    if state is not None:
        quoted = draw(st.booleans())
        value = _quote(state.value) if quoted else state.value
        terms.append((f"state{draw(gaps)}={draw(gaps)}{value}", not quoted))
    project_id = draw(st.none() | ids)
    if project_id is not None:
        quoted = draw(st.booleans())
        value = _quote(project_id) if quoted else project_id
        terms.append((f"project_id{draw(gaps)}={draw(gaps)}{value}", not quoted))
    labels = draw(st.dictionaries(label_keys, st.one_of(bare_values, st.text(st.characters(exclude_categories=("Cc",)), max_size=20)), max_size=4))
    for key, label_value in labels.items():
        bare = draw(st.booleans()) and _is_bare(label_value)
        value = label_value if bare else _quote(label_value)
        terms.append((f"labels.{key}{draw(gaps)}={draw(gaps)}{value}", bare))
    terms = draw(st.permutations(terms))
    text = draw(gaps)
    for i, (term, ends_bare) in enumerate(terms):
        text += term
        if i < len(terms) - 1:
            # after a bare value a space is needed, or `AND` would be read as part of the value
            text += (draw(spaces) if ends_bare else draw(gaps)) + "AND" + draw(spaces)
    text += draw(gaps)
    return text, Filter(state, project_id, tuple(sorted(labels.items())))


def _is_bare(value: str) -> bool:
    return bool(value) and all(c.isascii() and (c.isalnum() or c in "._-") for c in value)


@settings(max_examples=120, deadline=None)
@given(filters())
def test_parse_filter_reads_any_filter_from_the_grammar(case: tuple[str, Filter]) -> None:
    text, expected = case
    assert parse_filter(text) == expected


# --- parse_filter: rejected ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "state = BOGUS",
        "state = active",  # states are upper case
        "foo = 1",
        "state = ACTIVE AND",
        "state = ACTIVE AND   ",
        'state = ACTIVE OR project_id = "x"',
        'state = ACTIVE project_id = "x"',
        "state = ACTIVE AND AND state = ACTIVE",
        "AND state = ACTIVE",
        "state",
        "state =",
        "= ACTIVE",
        "state == ACTIVE",
        "state != ACTIVE",
        'state = "ACTIVE',
        'project_id = "-p1"',  # not a project id
        'project_id = "p 1"',
        'labels.Env = "prod"',
        'labels. = "prod"',
        'labels.env = "prod" garbage',
        "state = ACTIVE ANDlabels.env = x",
        "!!!",
        "(state = ACTIVE)",
        "state = ACTIVE; DROP TABLE api_keys",
    ],
)
def test_parse_filter_rejects_with_field_filter(text: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse_filter(text)
    assert caught.value.field == "filter"


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60))
@example('labels.a = "\\\n"')
@example("state = ACTIVE AND\x1c")
def test_parse_filter_on_arbitrary_text_returns_a_filter_or_raises_invalid_argument(text: str) -> None:
    try:
        result = parse_filter(text)
    except InvalidArgument as error:
        assert error.field == "filter"
    else:
        assert isinstance(result, Filter)


# --- page tokens --------------------------------------------------------------------------------

aware_datetimes = st.datetimes(
    min_value=datetime(1970, 1, 1), max_value=datetime(2200, 1, 1), timezones=st.sampled_from(
        [UTC, timezone(timedelta(hours=5, minutes=30)), timezone(timedelta(hours=-8))]
    )
)


@settings(max_examples=200, deadline=None)
@given(ids, st.text(max_size=40), aware_datetimes, st.text(max_size=40))
def test_page_token_round_trips(account_id: str, filter_text: str, when: datetime, key_id: str) -> None:
    token = encode_page_token(KEY, account_id, filter_text, (when, key_id))
    assert isinstance(token, str) and token.isascii()
    after = decode_page_token(KEY, token, account_id, filter_text)
    assert after == (when, key_id)
    assert after[0].utcoffset() == when.utcoffset()


@settings(max_examples=100, deadline=None)
@given(ids, ids, st.text(max_size=20), aware_datetimes)
def test_page_token_from_another_account_is_refused(account_id: str, other: str, filter_text: str, when: datetime) -> None:
    if other == account_id:
        other += "x"
    token = encode_page_token(KEY, account_id, filter_text, (when, "k"))
    with pytest.raises(InvalidArgument) as caught:
        decode_page_token(KEY, token, other, filter_text)
    assert caught.value.field == "page_token"


@settings(max_examples=100, deadline=None)
@given(ids, st.text(max_size=20), st.text(max_size=20), aware_datetimes)
def test_page_token_with_another_filter_is_refused(account_id: str, filter_text: str, other: str, when: datetime) -> None:
    if other == filter_text:
        other += " "
    token = encode_page_token(KEY, account_id, filter_text, (when, "k"))
    with pytest.raises(InvalidArgument) as caught:
        decode_page_token(KEY, token, account_id, other)
    assert caught.value.field == "page_token"


@settings(max_examples=300, deadline=None)
@given(st.text())
@example("")
@example("====")
@example("é")
@example(base64.urlsafe_b64encode(b"\xff\xfe\x00").decode())
def test_garbage_page_token_raises_invalid_argument(token: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        decode_page_token(KEY, token, "acme", "")
    assert caught.value.field == "page_token"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=80))
def test_base64_of_random_bytes_raises_invalid_argument(raw: bytes) -> None:
    token = base64.urlsafe_b64encode(raw).decode().rstrip("=")
    with pytest.raises(InvalidArgument) as caught:
        decode_page_token(KEY, token, "acme", "")
    assert caught.value.field == "page_token"


def _token(payload: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(payload).encode()).decode().rstrip("=")


@pytest.mark.parametrize(
    "payload",
    [
        None,
        1,
        "text",
        [],
        ["2024-01-01T00:00:00+00:00", "k"],
        {},
        {"t": "2024-01-01T00:00:00+00:00", "k": "k"},  # no fingerprint
        {"k": "k", "r": "0" * 16},
        {"t": 1700000000, "k": "k", "r": "0" * 16},
        {"t": "yesterday", "k": "k", "r": "0" * 16},
        {"t": None, "k": "k", "r": "0" * 16},
        {"t": "2024-01-01T00:00:00", "k": "k", "r": "0" * 16},  # naive time
        {"t": "2024-01-01T00:00:00+00:00", "k": "k", "r": "0" * 16},  # wrong fingerprint
    ],
)
def test_well_encoded_token_with_a_wrong_payload_raises_invalid_argument(payload: object) -> None:
    with pytest.raises(InvalidArgument) as caught:
        decode_page_token(KEY, _token(payload), "acme", "")
    assert caught.value.field == "page_token"


def test_token_of_deeply_nested_json_raises_invalid_argument() -> None:
    token = base64.urlsafe_b64encode(b"[" * 100_000).decode()
    with pytest.raises(InvalidArgument) as caught:
        decode_page_token(KEY, token, "acme", "")
    assert caught.value.field == "page_token"


def _old_format_token(position: list[object], kind: str, account_id: str, filter_text: str = "") -> str:
    """What a forger makes from public inputs: tokens used to carry a plain hash of the request."""
    import hashlib

    fingerprint = hashlib.sha256(f"{kind}\n{account_id}\n{filter_text}".encode()).hexdigest()[:16]
    return _token({"p": position, "r": fingerprint})


@pytest.mark.parametrize("event_id", [2**63, 2**63 + 5, -(2**63) - 1, 1])
def test_a_forged_event_token_is_refused_whatever_its_id(event_id: int) -> None:
    with pytest.raises(InvalidArgument, match="not one this server issued") as caught:
        decode_event_page_token(KEY, _old_format_token([event_id], "events", "acme"), "acme", "")
    assert caught.value.field == "page_token"


def test_a_token_signed_with_another_key_is_refused() -> None:
    token = encode_event_page_token(bytes(32), "acme", "", 42)
    assert decode_event_page_token(bytes(32), token, "acme", "") == 42
    with pytest.raises(InvalidArgument, match="not one this server issued"):
        decode_event_page_token(KEY, token, "acme", "")


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 2**63 - 1), st.data())
def test_any_edit_of_an_event_token_is_refused(event_id: int, data: st.DataObject) -> None:
    raw = bytearray(base64.urlsafe_b64decode(_pad(encode_event_page_token(KEY, "acme", "", event_id))))
    position = data.draw(st.integers(0, len(raw) - 1))
    raw[position] ^= 1 << data.draw(st.integers(0, 7))
    with pytest.raises(InvalidArgument):
        decode_event_page_token(KEY, base64.urlsafe_b64encode(bytes(raw)).decode(), "acme", "")


def _pad(token: str) -> str:
    return token + "=" * (-len(token) % 4)


# --- page size ----------------------------------------------------------------------------------


def test_page_size_zero_means_the_default() -> None:
    assert validate_page_size(0) == DEFAULT_PAGE_SIZE == 50


@pytest.mark.parametrize("size", [1001, 5000, 2**31 - 1])
def test_page_size_above_the_maximum_is_capped(size: int) -> None:
    assert validate_page_size(size) == MAX_PAGE_SIZE == 1000


@settings(deadline=None)
@given(st.integers(min_value=1, max_value=1000))
def test_page_size_in_range_is_kept(size: int) -> None:
    assert validate_page_size(size) == size


@pytest.mark.parametrize("size", [-1, -50, -(2**31)])
def test_negative_page_size_is_refused(size: int) -> None:
    with pytest.raises(InvalidArgument) as caught:
        validate_page_size(size)
    assert caught.value.field == "page_size"


@pytest.mark.parametrize("text", ["state = ACTIVE AND state = REVOKED", 'labels.env = "a" AND labels.env = "b"'])
def test_a_field_named_twice_is_refused_rather_than_silently_overwritten(text: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse_filter(text)
    assert caught.value.field == "filter" and "twice" in str(caught.value)
