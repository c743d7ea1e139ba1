"""domain/scopes: a granted or required scope parses or raises InvalidArgument naming its field."""

import atheris

with atheris.instrument_imports(include=["apikeyd"]):
    from apikeyd.domain import scopes
    from apikeyd.domain.errors import InvalidArgument

from fuzz.harness import main


def check(data: bytes) -> None:
    provider = atheris.FuzzedDataProvider(data)
    texts = [provider.ConsumeUnicodeNoSurrogates(40) for _ in range(provider.ConsumeIntInRange(1, 4))]
    try:
        for text in scopes.validate_scopes(texts):
            scopes.parse_scope(text)
    except InvalidArgument as error:
        assert error.field == "scopes", error
    try:
        scopes.parse_required_scopes(tuple(texts))
    except InvalidArgument as error:
        assert error.field == "required_scopes", error


if __name__ == "__main__":
    main(check)
