"""The key string: generate/parse round trip, secret strength, checksum against typos, redaction, masking."""

import math

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from apikeyd.domain import keys
from apikeyd.domain.keys import BASE62, PREFIX_PATTERN, ParsedKey, generate, mask, new_lookup_id, parse

prefixes = st.from_regex(PREFIX_PATTERN, fullmatch=True)
lookup_ids = st.text(alphabet=BASE62, min_size=keys.LOOKUP_ID_LENGTH, max_size=keys.LOOKUP_ID_LENGTH)
# every character a prefix may hold, plus '_' which also separates lookup id and secret
KEY_CHARS = BASE62 + "_"


def _secret_span(key: str, parsed: ParsedKey) -> tuple[int, int]:
    start = len(parsed.prefix) + len(parsed.lookup_id) + 1
    return start, start + len(parsed.secret)


# --- round trip and shape -------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(prefixes, lookup_ids)
@example("ak_", "0" * 16)
@example("a_" + "B" * 16 + "_", "C" * 16)  # prefix that itself looks like `<16 chars>_`
@example("A" + "_" * 24, "z" * 16)  # longest prefix, all underscores
def test_generate_then_parse_returns_the_same_parts(prefix: str, lookup_id: str) -> None:
    key, parts = generate(prefix, lookup_id)
    assert parts.prefix == prefix
    assert parts.lookup_id == lookup_id
    assert key.startswith(prefix + lookup_id + "_")
    assert parse(key) == parts


def test_new_lookup_id_is_sixteen_base62_characters_and_parses_back() -> None:
    ids = {new_lookup_id() for _ in range(200)}
    assert len(ids) == 200
    for lookup_id in ids:
        assert len(lookup_id) == 16 and set(lookup_id) <= set(BASE62)
        key, parts = generate("ak_", lookup_id)
        assert parse(key) == parts


def test_secret_is_at_least_192_bits_of_base62() -> None:
    for _ in range(50):
        _, parts = generate("ak_", new_lookup_id())
        assert len(parts.secret) >= 33
        assert set(parts.secret) <= set(BASE62)
        assert len(parts.secret) * math.log2(62) >= 192


def test_secret_characters_are_drawn_from_the_whole_base62_alphabet() -> None:
    # 200 secrets * 33 chars: missing any one of 62 symbols by chance has probability ~ 62 * (61/62)**6600
    seen: set[str] = set()
    for _ in range(200):
        seen |= set(generate("ak_", "L" * 16)[1].secret)
    assert seen == set(BASE62)


def test_two_generated_keys_differ() -> None:
    generated = [generate("ak_", "L" * 16) for _ in range(500)]
    assert len({key for key, _ in generated}) == 500
    assert len({parts.secret for _, parts in generated}) == 500


@pytest.mark.parametrize(
    "prefix",
    ["", "ak", "_ak_", "1ak_", "a-k_", "ak-", "ak_ ", " ak_", "ák_", "a" * 25 + "_", "ak.", "ak:", "ak_\n"],
)
def test_generate_refuses_invalid_prefixes(prefix: str) -> None:
    assert not keys.is_valid_prefix(prefix)
    with pytest.raises(ValueError):
        generate(prefix, "L" * 16)


def test_longest_valid_prefix_is_accepted() -> None:
    prefix = "a" * 24 + "_"
    key, parts = generate(prefix, "L" * 16)
    assert parse(key) == parts


# --- the checksum refuses every single-character typo ------------------------------------------


@settings(max_examples=25, deadline=None)
@given(prefixes, lookup_ids)
def test_every_single_character_substitution_is_rejected(prefix: str, lookup_id: str) -> None:
    key, _ = generate(prefix, lookup_id)
    for i, original in enumerate(key):
        for replacement in KEY_CHARS:
            if replacement != original:
                typo = key[:i] + replacement + key[i + 1 :]
                assert parse(typo) is None, (key, i, replacement)


@settings(max_examples=50, deadline=None)
@given(prefixes, lookup_ids)
def test_every_single_character_deletion_is_rejected(prefix: str, lookup_id: str) -> None:
    key, _ = generate(prefix, lookup_id)
    for i in range(len(key)):
        assert parse(key[:i] + key[i + 1 :]) is None, (key, i)


@settings(max_examples=25, deadline=None)
@given(prefixes, lookup_ids)
def test_every_single_character_insertion_is_rejected(prefix: str, lookup_id: str) -> None:
    key, _ = generate(prefix, lookup_id)
    for i in range(len(key) + 1):
        for inserted in KEY_CHARS:
            assert parse(key[:i] + inserted + key[i:]) is None, (key, i, inserted)


@settings(max_examples=50, deadline=None)
@given(prefixes, lookup_ids)
def test_every_adjacent_transposition_is_rejected(prefix: str, lookup_id: str) -> None:
    key, _ = generate(prefix, lookup_id)
    for i in range(len(key) - 1):
        if key[i] != key[i + 1]:
            swapped = key[:i] + key[i + 1] + key[i] + key[i + 2 :]
            assert parse(swapped) is None, (key, i)


def test_case_change_and_surrounding_whitespace_are_rejected() -> None:
    key, parts = generate("ak_", "L" * 16)
    assert parse(key) == parts
    assert parse(key.swapcase()) is None
    for padded in (" " + key, key + " ", key + "\n", "\t" + key):
        assert parse(padded) is None


# --- parse is total --------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.text())
@example("")
@example("ak_" + "0" * 16 + "_" + "0" * 39)
@example("ak_" + "é" * 16 + "_" + "0" * 39)
def test_parse_never_raises_on_arbitrary_text(text: str) -> None:
    result = parse(text)
    assert result is None or isinstance(result, ParsedKey)


@settings(max_examples=150, deadline=None)
@given(st.from_regex(r"[A-Za-z][A-Za-z0-9_]{0,23}_[0-9A-Za-z]{16}_[0-9A-Za-z]{39}", fullmatch=True))
def test_well_shaped_string_parses_only_with_the_right_checksum(text: str) -> None:
    body = text[:-6]
    assert (parse(text) is not None) == (keys._checksum(body) == text[-6:])
    fixed = body + keys._checksum(body)
    parsed = parse(fixed)
    assert parsed is not None
    assert fixed == f"{parsed.prefix}{parsed.lookup_id}_{parsed.secret}{fixed[-6:]}"


# --- no secret in repr or mask --------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(prefixes, lookup_ids)
def test_repr_and_str_of_parsed_key_never_hold_the_secret(prefix: str, lookup_id: str) -> None:
    key, parts = generate(prefix, lookup_id)
    parsed = parse(key)
    assert parsed is not None
    for text in (repr(parsed), str(parsed), repr(parts), repr([parsed]), f"{parsed}"):
        assert parsed.secret not in text
        assert key not in text
        assert lookup_id in text  # still useful in a log


@settings(max_examples=200, deadline=None)
@given(prefixes, lookup_ids)
def test_mask_shows_the_prefix_never_the_secret_and_is_not_a_key(prefix: str, lookup_id: str) -> None:
    key, parts = generate(prefix, lookup_id)
    masked = mask(key)
    assert masked.startswith(prefix)
    assert parts.secret not in masked
    # no run of 6 or more secret characters survives anywhere in the mask
    start, end = _secret_span(key, parts)
    assert key[start:end] == parts.secret
    for i in range(len(parts.secret) - 5):
        assert parts.secret[i : i + 6] not in masked[len(prefix) :]
    assert len(masked) < len(key)
    assert parse(masked) is None
    assert masked.endswith(key[-4:])


def test_mask_refuses_a_string_that_is_not_a_key() -> None:
    with pytest.raises(ValueError):
        mask("not a key")


@pytest.mark.parametrize("lookup_id", ["short", "x" * 17, "0123456789abcde!"])
def test_generate_refuses_a_lookup_id_that_parse_would_refuse(lookup_id: str) -> None:
    with pytest.raises(ValueError):
        generate("AK_", lookup_id)
