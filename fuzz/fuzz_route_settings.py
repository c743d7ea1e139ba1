"""service/ext_authz_http and envoy_checks: an Envoy route's x-apikeyd-route header parses into a Route or
raises InvalidArgument, whatever its bytes; never another exception (which would answer 500 INTERNAL)."""

import atheris

with atheris.instrument_imports(include=["apikeyd"]):
    from apikeyd.domain.errors import InvalidArgument
    from apikeyd.service.envoy_checks import parse_route
    from apikeyd.service.ext_authz_http import route_settings

from fuzz.harness import main


def check(data: bytes) -> None:
    text = atheris.FuzzedDataProvider(data).ConsumeUnicodeNoSurrogates(600)
    try:
        parse_route(route_settings(text))
    except InvalidArgument:
        pass


if __name__ == "__main__":
    main(check)
