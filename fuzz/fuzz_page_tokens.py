"""domain/listing page tokens: a token this key issued for this request decodes to its position; any other
text, or an issued token with any byte changed, raises InvalidArgument("page_token")."""

import base64
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import atheris

with atheris.instrument_imports(include=["apikeyd"]):
    from apikeyd.domain import listing
    from apikeyd.domain.errors import InvalidArgument

from fuzz.harness import main

_KEY = bytes(range(32))


def _refused(decode: Callable[..., object], *args: object) -> None:
    try:
        decode(_KEY, *args)
    except InvalidArgument as error:
        assert error.field == "page_token", error
        return
    raise AssertionError(f"accepted {args!r}")


def check(data: bytes) -> None:
    provider = atheris.FuzzedDataProvider(data)
    account, filter_text = provider.ConsumeUnicodeNoSurrogates(8), provider.ConsumeUnicodeNoSurrogates(16)
    choice = provider.ConsumeIntInRange(0, 3)
    if choice == 0:  # anything at all
        text = provider.ConsumeUnicodeNoSurrogates(120)
        for decode in (listing.decode_page_token, listing.decode_event_page_token, listing.decode_usage_page_token):
            try:
                decode(_KEY, text, account, filter_text)
            except InvalidArgument as error:
                assert error.field == "page_token", error
        return
    if choice == 1:
        event_id = provider.ConsumeIntInRange(1, 2**63 - 1)
        token = listing.encode_event_page_token(_KEY, account, filter_text, event_id)
        assert listing.decode_event_page_token(_KEY, token, account, filter_text) == event_id
        decode: Callable[..., object] = listing.decode_event_page_token
    elif choice == 2:
        when = datetime(2000, 1, 1, tzinfo=UTC) + timedelta(microseconds=provider.ConsumeIntInRange(0, 10**16))
        position = (when, provider.ConsumeUnicodeNoSurrogates(36))
        token = listing.encode_page_token(_KEY, account, filter_text, position)
        assert listing.decode_page_token(_KEY, token, account, filter_text) == position
        decode = listing.decode_page_token
    else:
        bucket = datetime(2000, 1, 1, tzinfo=UTC) + timedelta(minutes=provider.ConsumeIntInRange(0, 10**7))
        end = bucket + timedelta(minutes=provider.ConsumeIntInRange(1, 10**7))
        after = (provider.ConsumeUnicodeNoSurrogates(36), bucket)
        token = listing.encode_usage_page_token(_KEY, account, filter_text, after, end)
        assert listing.decode_usage_page_token(_KEY, token, account, filter_text) == (after, end)
        decode = listing.decode_usage_page_token
    raw = bytearray(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    raw[provider.ConsumeIntInRange(0, len(raw) - 1)] ^= provider.ConsumeIntInRange(1, 255)
    _refused(decode, base64.urlsafe_b64encode(bytes(raw)).decode().rstrip("="), account, filter_text)
    _refused(decode, token, account + "x", filter_text)


if __name__ == "__main__":
    main(check)
