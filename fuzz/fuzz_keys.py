"""domain/keys.parse: a key string's parts, or None; never an exception, whatever the text."""

import atheris

with atheris.instrument_imports(include=["apikeyd"]):
    from apikeyd.domain import keys

from fuzz.harness import main

_PREFIX, _LOOKUP = "AK_", "a" * keys.LOOKUP_ID_LENGTH


def check(data: bytes) -> None:
    provider = atheris.FuzzedDataProvider(data)
    if provider.ConsumeBool():
        # A real key with one character changed: the checksum must catch it, or it is still a key.
        key, _ = keys.generate(_PREFIX, _LOOKUP)
        position = provider.ConsumeIntInRange(0, len(key) - 1)
        text = key[:position] + provider.ConsumeUnicodeNoSurrogates(2) + key[position + 1 :]
    else:
        text = provider.ConsumeUnicodeNoSurrogates(200)
    parsed = keys.parse(text)
    if parsed is not None:
        assert text.startswith(parsed.prefix + parsed.lookup_id + "_" + parsed.secret), text
        assert keys.find(text)


if __name__ == "__main__":
    main(check)
