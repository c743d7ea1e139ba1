"""domain/listing filters: ListApiKeys and ListAuditEvents filters parse or raise InvalidArgument("filter").

The input is mostly built from the grammar's own pieces, so the fuzzer spends its time past the first term.
"""

import atheris

with atheris.instrument_imports(include=["apikeyd"]):
    from apikeyd.domain import listing
    from apikeyd.domain.errors import InvalidArgument

from fuzz.harness import main

_PIECES = [
    "state", "project_id", "labels.env", "labels.", "key_id", "actor_key_id", "kind", "event_time",
    "=", ">=", "<=", "<", ">", " AND ", "AND", '"', "\\", "ACTIVE", "REVOKED", "created", "p1",
    "0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00", "2026-01-01T00:00:00Z", "2026-01-01T00:00:00",
    "\x00", " ", "é",
]  # fmt: skip


def _text(provider: atheris.FuzzedDataProvider) -> str:
    parts = []
    for _ in range(provider.ConsumeIntInRange(0, 12)):
        if provider.ConsumeProbability() < 0.8:
            parts.append(_PIECES[provider.ConsumeIntInRange(0, len(_PIECES) - 1)])
        else:
            parts.append(provider.ConsumeUnicodeNoSurrogates(6))
    return "".join(parts)


def check(data: bytes) -> None:
    provider = atheris.FuzzedDataProvider(data)
    text = _text(provider)
    for parse in (listing.parse_filter, listing.parse_event_filter):
        try:
            parsed = parse(text)
        except InvalidArgument as error:
            assert error.field == "filter", error
            continue
        for _, when in getattr(parsed, "times", ()):
            assert when.utcoffset() is not None and when.utcoffset().total_seconds() == 0, text


if __name__ == "__main__":
    main(check)
