"""Settings: each has a default, an `APIKEYD_*` environment variable and a `serve` flag of the same name
(`APIKEYD_CACHE_TTL` <-> `--cache-ttl`); a flag beats the variable, the variable beats the default."""

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from apikeyd.domain.echo import quote
from apikeyd.domain.limits import DEFAULT_MAX_REQUEST_BYTES


def _setting(default: Any, help: str, empty_is_off: bool = False) -> Any:
    """`empty_is_off`: an empty variable (`APIKEYD_METRICS_LISTEN=`, as a container sets one) is the empty
    string, which turns the setting off; for every other setting an empty variable is a mistake (an unset
    `${VAR}` in a compose file, say) and refused, never taken silently for the default."""
    return field(default=default, metadata={"help": help, "empty_is_off": empty_is_off})


_BOOLEANS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


def _parse(name: str, raw: str, kind: type) -> Any:
    try:
        return _BOOLEANS[raw.strip().lower()] if kind is bool else kind(raw)
    except (ValueError, KeyError):
        raise ValueError(f"{name}={quote(raw)} is not a valid {kind.__name__}") from None


@dataclass(frozen=True)
class Settings:
    listen: str = _setting("127.0.0.1:50051", "host:port to serve gRPC on; a taken port is an error")
    tls_cert: str = _setting("", "PEM certificate chain file: serve TLS (with tls_key)", empty_is_off=True)
    tls_key: str = _setting("", "PEM private key file of tls_cert", empty_is_off=True)
    tls_client_ca: str = _setting("", "PEM CA file: require client certificates signed by it (mTLS)", empty_is_off=True)
    database_url: str = _setting("sqlite:///apikeyd.db", "SQLAlchemy URL; postgresql://... selects PostgreSQL")
    cache_size: int = _setting(100_000, "verified keys kept in memory (LRU)")
    cache_ttl: float = _setting(60.0, "seconds a verified key is trusted before it is read again")
    negative_cache_ttl: float = _setting(10.0, "seconds an unknown key or wrong secret is remembered")
    max_verifications: int = _setting(4, "argon2 verifications (with their database read) run at once")
    verification_queue: int = _setting(
        256, "cold checks that may wait for a verification thread (taken in turn by lookup id); more get UNAVAILABLE"
    )
    failure_budget: int = _setting(
        5, "wrong secrets for one lookup id per failure_window before its unverified strings are refused as "
        "NOT_FOUND without a database read or argon2 (0 disables)"
    )
    failure_window: float = _setting(60.0, "seconds of the failure_budget window, from its first failure")
    argon2_time_cost: int = _setting(1, "argon2id iterations")
    argon2_memory_kib: int = _setting(8192, "argon2id memory per hash, KiB")
    argon2_parallelism: int = _setting(1, "argon2id lanes")
    operator_account: str = _setting("system", "account whose keys act on every account")
    max_keys_per_account: int = _setting(1000, "live (not revoked) keys an account may hold")
    authorize_requires_key: bool = _setting(
        False, "make Authorize require a bearer key with scope apikeys:authorize"
    )
    account_key_prefix: str = _setting("AK_", "prefix of new account-wide keys")
    project_key_prefix: str = _setting("AKP_", "prefix of new project keys")
    last_used_flush_interval: float = _setting(
        30.0, "seconds between batched writes of last-used times and usage counts (at most this much usage is lost "
        "if the process is killed without SIGTERM)"
    )
    usage_retention_minute: float = _setting(172_800.0, "seconds minute buckets of usage are kept (2 days); 0 keeps them")
    usage_retention_hour: float = _setting(7_776_000.0, "seconds hour buckets of usage are kept (90 days); 0 keeps them")
    usage_retention_day: float = _setting(63_072_000.0, "seconds day buckets of usage are kept (2 years); 0 keeps them")
    usage_cleanup_rows: int = _setting(
        50_000, "most usage buckets past their retention deleted per granularity per flush, 1000 per transaction"
    )
    drain_delay: float = _setting(
        0.0, "seconds to keep serving after SIGTERM with health NOT_SERVING, so load balancers stop routing here"
    )
    shutdown_grace: float = _setting(10.0, "seconds in-flight calls get to finish once the listener closes")
    max_request_bytes: int = _setting(
        DEFAULT_MAX_REQUEST_BYTES,
        "largest request message accepted, bytes (at least 16384); larger ones get RESOURCE_EXHAUSTED from grpc",
    )
    max_concurrent_rpcs: int = _setting(
        1000, "calls served at once, open health Watch streams included (at least 100); more get RESOURCE_EXHAUSTED"
    )
    keepalive_interval: float = _setting(
        60.0, "seconds between HTTP/2 pings on a connection the client has sent nothing on; one unanswered for as "
        "long is closed, with its calls, so a client that vanished holds no stream (0 disables)"
    )
    max_change_streams: int = _setting(
        1000, "WatchApiKeyChanges streams open at once (client-side caches), counted apart from max_concurrent_rpcs; "
        "more get RESOURCE_EXHAUSTED"
    )
    db_pool_size: int = _setting(5, "database connections kept open (PostgreSQL)")
    log_level: str = _setting("INFO", "DEBUG, INFO, WARNING or ERROR")
    log_format: str = _setting(
        "auto", "json (one object per line), text, or auto: text when stderr is a terminal, json otherwise"
    )
    metrics_listen: str = _setting(
        "127.0.0.1:9464", "host:port to serve Prometheus metrics on over HTTP (/metrics); empty disables",
        empty_is_off=True,
    )
    ext_authz_listen: str = _setting(
        "127.0.0.1:50052", "host:port or unix:/path to answer Envoy's ext_authz over HTTP on (deploy/envoy/envoy.yaml); "
        "empty disables", empty_is_off=True,
    )
    xff_trusted_hops: int = _setting(
        0, "proxies of your own in front of Envoy: a key's allowed_ip_ranges are checked against the address that "
        "many entries from the right of x-forwarded-for (as Envoy's xff_num_trusted_hops); 0 takes Envoy's "
        "downstream address and ignores x-forwarded-for"
    )
    tracing: str = _setting(
        "off", "off, or otlp: a span per RPC and per HTTP ext_authz check to an OTLP collector over gRPC, "
        "configured by the standard OTEL_* variables (docs/tracing.md); needs the tracing extra"
    )
    feed_poll_interval: float = _setting(
        0.0, "seconds between reads of the key_events change feed; 0 picks 0.25 on SQLite, 0.5 on PostgreSQL "
        "(where LISTEN/NOTIFY wakes it at once and the read is a fallback); must be less than feed_lease"
    )
    feed_lease: float = _setting(
        1.0, "seconds cached keys are trusted past the change feed's last successful read: the bound within "
        "which a change made by another process is in force here, whatever fails"
    )
    stale_if_error: float = _setting(
        300.0, "seconds past the change feed's last successful read during which keys this process verified "
        "keep being authorized while the database does not answer (0: refuse them too)"
    )
    health_check_interval: float = _setting(
        2.0, "seconds between database pings; health says NOT_SERVING while they fail (0 disables)"
    )
    rate_limit_url: str = _setting(
        "", "redis://host:port/db: rate limits shared by every process and replica; empty keeps them per process",
        empty_is_off=True,
    )
    rate_limit_prefix: str = _setting("apikeyd", "prefix of the Redis keys of rate_limit_url")
    rate_limit_failure: str = _setting(
        "allow", "allow or deny the requests of rate-limited keys while rate_limit_url does not answer"
    )
    workers: int = _setting(
        1, "server processes sharing the listen port (SO_REUSEPORT when more than 1), each with its own cache"
    )
    worker_hang_timeout: float = _setting(
        10.0, "seconds without a heartbeat from a serving worker's event loop after which the supervisor of "
        "--workers N kills it (SIGKILL) and starts another; 0 disables"
    )

    @staticmethod
    def env_name(name: str) -> str:
        return "APIKEYD_" + name.upper()

    @classmethod
    def load(cls, environ: dict[str, str] | None = None, **overrides: Any) -> "Settings":
        """Defaults, then APIKEYD_* variables, then the overrides that are not None."""
        environ = dict(os.environ) if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = environ.get(cls.env_name(f.name))
            if raw is None:
                continue
            if raw.strip() == "":
                if not f.metadata["empty_is_off"]:
                    default = f.default if f.default != "" else "unset"
                    raise ValueError(
                        f"{cls.env_name(f.name)} is set but empty: give it a value, or unset it for the default "
                        f"({default})"
                    )
                values[f.name] = ""
                continue
            values[f.name] = _parse(cls.env_name(f.name), raw, type(f.default))
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)
