"""Scopes: the `resource:action[:qualifier]` grammar, validation, and which granted scopes satisfy which required."""

import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from apikeyd.domain.echo import quote
from apikeyd.domain.errors import InvalidArgument
from apikeyd.domain.scopes import ScopeSet, parse_required, parse_required_scopes, parse_scope, validate_scopes

# parts: lower-case letters, digits, '-', '_', '.'
any_parts = st.from_regex(r"[a-z0-9._-]{1,12}", fullmatch=True)
# a few fixed parts so that granted and required scopes often share resource or action
parts = st.one_of(st.sampled_from(["keys", "users", "a", "b.c", "x-y_z", "0"]), any_parts)
# a qualifier value: 1-255 characters, no braces, no whitespace ("all" has a test of its own below)
values = st.one_of(
    st.sampled_from(["r1", "r2", "Doc-7", "a:b", "ALL", "*"]),
    st.from_regex(r"[^{}\s]{1,40}", fullmatch=True),
).filter(lambda v: v != "all")
resources = st.one_of(st.sampled_from(["r1", "r2", "Doc-7", "a:b", "all", "", "*"]), values)


@st.composite
def granted_scopes(draw: st.DrawFn) -> str:
    kind = draw(st.sampled_from(["plain", "all", "value", "wildcard"]))
    if kind == "wildcard":
        return "*"
    base = f"{draw(parts)}:{draw(parts)}"
    if kind == "plain":
        return base
    if kind == "all":
        return base + ":all"
    return f"{base}:{{{draw(values)}}}"


def reference_grants(granted: str, resource_action: tuple[str, str], resource: str) -> bool:
    """The rule from the module docstring, written out independently of ScopeSet."""
    if granted == "*":
        return True
    pieces = granted.split(":", 2)
    if (pieces[0], pieces[1]) != resource_action:
        return False
    if len(pieces) == 2 or pieces[2] == "all":
        return True
    assert pieces[2].startswith("{") and pieces[2].endswith("}")
    return pieces[2][1:-1] == resource


# --- grammar ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "resource", "action", "value"),
    [
        ("keys:read", "keys", "read", None),
        ("keys:read:all", "keys", "read", None),
        ("keys:read:{k1}", "keys", "read", "k1"),
        ("a.b-c_d:0.9:{Some:Value/With-Stuff}", "a.b-c_d", "0.9", "Some:Value/With-Stuff"),
        ("k:r:{" + "v" * 255 + "}", "k", "r", "v" * 255),
    ],
)
def test_parse_scope_accepts_the_grammar(text: str, resource: str, action: str, value: str | None) -> None:
    scope = parse_scope(text)
    assert scope is not None
    assert (scope.resource, scope.action) == (resource, action)
    # what the qualifier means, checked through ScopeSet (Scope's own field for it is an internal detail)
    scope_set = ScopeSet((text,))
    assert scope_set.grants((resource, action), "some-other-resource") == (value is None)
    if value is not None:
        assert scope_set.grants((resource, action), value)


def test_wildcard_parses_to_none() -> None:
    assert parse_scope("*") is None


@settings(max_examples=100, deadline=None)
@given(any_parts, any_parts, st.one_of(st.none(), st.just("all"), values))
def test_parse_scope_reads_resource_and_action_of_generated_scopes(
    resource: str, action: str, qualifier: str | None
) -> None:
    text = f"{resource}:{action}"
    if qualifier == "all":
        text += ":all"
    elif qualifier is not None:
        text += f":{{{qualifier}}}"
    scope = parse_scope(text)
    assert scope is not None
    assert (scope.resource, scope.action) == (resource, action)


@pytest.mark.parametrize(
    "text",
    [
        "Keys:read",  # upper case resource
        "keys:Read",  # upper case action
        "keys:read:ALL",  # upper case qualifier keyword
        "keys: read",  # spaces
        "keys :read",
        " keys:read",
        "keys:read ",
        "keys read",
        "keys",  # missing action
        "keys:",
        ":read",
        "",
        "keys:read:{}",  # empty braces
        "keys:read:some",  # qualifier neither `all` nor `{value}`
        "keys:read:",
        "keys:read:{a b}",
        "keys:read:{a}b",
        "keys:read:{a{b}",
        "keys:read:{a",
        "keys:read:all:extra",
        "keys:read:{a}:all",
        "keys/read",
        "**",
        "* ",
        "keys:*",
        "k:r:{" + "v" * 256 + "}",  # qualifier value longer than 255
    ],
)
def test_parse_scope_rejects_bad_scopes_naming_them(text: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse_scope(text)
    assert caught.value.field == "scopes"
    assert quote(text) in str(caught.value)  # named, as far as a message may repeat it


def test_parse_scope_reports_the_field_it_is_given() -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse_scope("Bad", field="api_key.scopes")
    assert caught.value.field == "api_key.scopes"
    assert "Bad" in str(caught.value)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40))
def test_parse_scope_on_arbitrary_text_returns_or_raises_invalid_argument(text: str) -> None:
    try:
        scope = parse_scope(text)
    except InvalidArgument as error:
        assert error.field == "scopes"
        return
    if scope is None:
        assert text == "*"
    else:
        assert text.startswith(f"{scope.resource}:{scope.action}")


# --- required scopes ----------------------------------------------------------------------------


def test_parse_required_accepts_resource_action() -> None:
    assert parse_required("keys:read") == ("keys", "read")
    assert parse_required("a.b-c_d:0.9") == ("a.b-c_d", "0.9")


@pytest.mark.parametrize(
    "text", ["keys:read:all", "keys:read:{k1}", "*", "keys", "Keys:read", "keys:read ", "", "keys:read:"]
)
def test_parse_required_rejects_qualifiers_and_bad_text(text: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse_required(text)
    assert caught.value.field == "required_scopes"
    assert text in str(caught.value)


# --- validate_scopes ----------------------------------------------------------------------------


@pytest.mark.parametrize("empty", [[], ()])
def test_validate_scopes_rejects_an_empty_list(empty: list[str]) -> None:
    with pytest.raises(InvalidArgument) as caught:
        validate_scopes(empty)
    assert caught.value.field == "scopes"


@settings(max_examples=100, deadline=None)
@given(st.lists(granted_scopes(), min_size=1, max_size=20).flatmap(lambda xs: st.lists(st.sampled_from(xs), min_size=1, max_size=40)))
def test_validate_scopes_drops_duplicates_keeping_first_occurrence_order(scopes: list[str]) -> None:
    result = validate_scopes(scopes)
    assert isinstance(result, tuple)
    assert len(set(result)) == len(result)
    assert set(result) == set(scopes)
    assert list(result) == sorted(set(scopes), key=scopes.index)


def test_validate_scopes_rejects_a_list_with_one_bad_scope_naming_it() -> None:
    with pytest.raises(InvalidArgument) as caught:
        validate_scopes(["keys:read", "Keys:write", "users:read"])
    assert caught.value.field == "scopes"
    assert "Keys:write" in str(caught.value)


def test_validate_scopes_caps_the_number_of_scopes() -> None:
    assert len(validate_scopes([f"r{i}:a" for i in range(100)])) == 100
    with pytest.raises(InvalidArgument) as caught:
        validate_scopes([f"r{i}:a" for i in range(101)])
    assert caught.value.field == "scopes"


# --- matching -----------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(parts, parts, resources, st.booleans())
def test_unqualified_or_all_grant_satisfies_for_every_resource(r: str, a: str, resource: str, with_all: bool) -> None:
    granted = f"{r}:{a}:all" if with_all else f"{r}:{a}"
    scope_set = ScopeSet((granted,))
    assert scope_set.grants((r, a), resource)
    assert scope_set.missing(parse_required_scopes((f"{r}:{a}",)), resource) == []


@settings(max_examples=200, deadline=None)
@given(parts, parts, values, resources)
@example("keys", "read", "k1", "k1")
@example("keys", "read", "k1", "k2")
@example("keys", "read", "ALL", "all")
def test_value_qualified_grant_satisfies_only_its_own_resource(r: str, a: str, value: str, resource: str) -> None:
    scope_set = ScopeSet((f"{r}:{a}:{{{value}}}",))
    assert scope_set.grants((r, a), resource) == (resource == value)
    assert scope_set.grants((r, a), value)
    assert scope_set.missing(parse_required_scopes((f"{r}:{a}",)), resource) == ([] if resource == value else [f"{r}:{a}"])


def test_braced_value_named_all_grants_only_the_resource_named_all() -> None:
    """`r:a:{all}` names the resource "all"; it must not widen into `r:a:all` (it did at d6b1b72)."""
    scope_set = ScopeSet(("keys:read:{all}",))
    assert scope_set.grants(("keys", "read"), "all")
    assert not scope_set.grants(("keys", "read"), "k1")
    assert scope_set.missing(parse_required_scopes(("keys:read",)), "k1") == ["keys:read"]


@settings(max_examples=200, deadline=None)
@given(parts, parts, resources)
def test_wildcard_satisfies_anything(r: str, a: str, resource: str) -> None:
    scope_set = ScopeSet(("*",))
    assert scope_set.grants((r, a), resource)
    assert scope_set.missing(parse_required_scopes((f"{r}:{a}", "x:y")), resource) == []


@settings(max_examples=150, deadline=None)
@given(granted_scopes().filter(lambda s: s != "*"), parts, parts, resources)
def test_grant_with_other_resource_or_action_never_satisfies(granted: str, r: str, a: str, resource: str) -> None:
    g_resource, g_action = granted.split(":")[:2]
    assume((r, a) != (g_resource, g_action))
    scope_set = ScopeSet((granted,))
    qualifier = granted[len(g_resource) + len(g_action) + 3 : -1]  # the braced value, if any
    for required in [(r, a), (g_resource, a), (r, g_action)]:
        if required != (g_resource, g_action):
            for res in (resource, qualifier, "all"):
                assert not scope_set.grants(required, res)
                assert scope_set.missing(parse_required_scopes((":".join(required),)), res) == [":".join(required)]


@settings(max_examples=150, deadline=None)
@given(
    st.lists(granted_scopes(), max_size=6),
    st.lists(st.tuples(parts, parts), max_size=8),
    resources,
)
def test_missing_is_exactly_the_required_scopes_not_granted_in_order(
    granted: list[str], required_pairs: list[tuple[str, str]], resource: str
) -> None:
    # make the required scopes overlap the granted ones often
    required = [f"{r}:{a}" for r, a in required_pairs]
    required += [":".join(g.split(":")[:2]) for g in granted if g != "*"]
    required = required[::-1] + required[:2]
    scope_set = ScopeSet(tuple(granted))
    expected = [
        text
        for text in required
        if not any(reference_grants(g, tuple(text.split(":")), resource) for g in granted)  # type: ignore[arg-type]
    ]
    assert scope_set.missing(parse_required_scopes(tuple(required)), resource) == expected


def test_missing_keeps_order_and_repeats_of_the_request() -> None:
    scope_set = ScopeSet(("keys:read", "users:write:{u1}", "docs:read:all"))
    required = parse_required_scopes(("users:write", "keys:write", "keys:read", "docs:read", "keys:write", "billing:read"))
    assert scope_set.missing(required, "u1") == ["keys:write", "keys:write", "billing:read"]
    assert scope_set.missing(required, "u2") == ["users:write", "keys:write", "keys:write", "billing:read"]


def test_empty_grant_satisfies_nothing_and_empty_requirement_is_always_met() -> None:
    assert ScopeSet(()).missing(parse_required_scopes(("keys:read",)), "r") == ["keys:read"]
    assert ScopeSet(()).missing(parse_required_scopes(()), "r") == []


def test_a_qualified_required_scope_is_refused() -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse_required_scopes(("keys:read", "keys:read:all"))
    assert caught.value.field == "required_scopes"
