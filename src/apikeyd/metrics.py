"""Prometheus metrics, served over HTTP on their own port (`APIKEYD_METRICS_LISTEN`, path `/metrics`).

The hot path pays almost nothing: a cached Authorize adds plain integer increments and one `bisect` on
lists owned by the event loop, and everything else (cache counters and size, argon2 verifications, calls in
flight) is read from the objects that already keep it, when Prometheus scrapes. prometheus_client's own
metric objects take a lock per update, so they are used only off the hot path.

Label values are method names, gRPC status codes and Authorize codes: never a key, key id, account,
project or name.

Each App has its own registry, so servers in one process (the tests) never share or clash.
"""

import bisect
import socket
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, GCCollector, ProcessCollector, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from apikeyd.domain.decision import AuthCode

# The names, for dashboards, alerts and the README.
AUTHORIZE_DECISIONS = "apikeyd_authorize_decisions_total"
AUTHORIZE_SECONDS = "apikeyd_authorize_duration_seconds"
EXT_AUTHZ_CHECK_SECONDS = "apikeyd_ext_authz_check_duration_seconds"
RPCS = "apikeyd_rpcs_total"
EXT_AUTHZ_HTTP_ANSWERS = "apikeyd_ext_authz_http_answers_total"
CACHE_HITS = "apikeyd_cache_hits_total"
CACHE_MISSES = "apikeyd_cache_misses_total"
CACHE_NEGATIVE_HITS = "apikeyd_cache_negative_hits_total"
CACHE_STALE_HITS = "apikeyd_cache_stale_hits_total"
AUDIT_DENIALS_SUPPRESSED = "apikeyd_audit_denials_suppressed_total"
CACHE_EVICTIONS = "apikeyd_cache_evictions_total"
CACHE_ENTRIES = "apikeyd_cache_entries"
VERIFICATIONS_IN_FLIGHT = "apikeyd_verifications_in_flight"
VERIFICATION_SECONDS = "apikeyd_verification_duration_seconds"
ARGON2_VERIFICATIONS = "apikeyd_argon2_verifications_total"
FAILURE_BUDGET_REFUSALS = "apikeyd_failure_budget_refusals_total"
VERIFICATION_QUEUE_REFUSALS = "apikeyd_verification_queue_refusals_total"
VERIFICATIONS_QUEUED = "apikeyd_verifications_queued"
CHANGE_STREAMS = "apikeyd_change_streams"

# From 50 us (a cached check) to 2.5 s (a miss queued behind busy verifications).
FAST_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
)  # fmt: skip
SLOW_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class LoopHistogram:
    """A latency histogram for the event loop's hot path: `observe` is one bisect and two additions on
    plain Python objects, with no lock, so every observation of one histogram must come from one thread
    (the event loop). A scrape reads it from another thread; at worst it misses the observation in
    progress."""

    __slots__ = ("bounds", "counts", "documentation", "name", "sum")

    def __init__(self, name: str, documentation: str, bounds: Iterable[float] = FAST_BUCKETS) -> None:
        self.name = name
        self.documentation = documentation
        self.bounds = tuple(sorted(bounds))
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        # Prometheus buckets are `le`: a value equal to a bound belongs to that bound's bucket.
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds

    def family(self) -> HistogramMetricFamily:
        counts, total = list(self.counts), self.sum
        cumulative, buckets = 0, []
        for bound, count in zip((*map(floatToGoString, self.bounds), "+Inf"), counts):
            cumulative += count
            buckets.append((bound, cumulative))
        family = HistogramMetricFamily(_base(self.name), self.documentation)
        family.add_metric([], buckets, total)
        return family


def _base(name: str) -> str:
    """prometheus_client's families take a counter's name without `_total`."""
    return name.removesuffix("_total")


class Metrics(Collector):
    """Every metric of one App, in its own registry.

    The hot-path state is plain: `decisions` (a list indexed by AuthCode, bumped by the Authorizer),
    `rpc_counts` (a dict {(method, status code name): calls}, bumped by `grpc_errors`),
    `ext_authz_http_answers` ({HTTP status: checks}), and the
    LoopHistograms `authorize_seconds`, `ext_authz_check_seconds` and `verification_seconds`; all are
    updated on the event loop thread only. `watch` connects the objects read at scrape time."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.decisions = [0] * (max(AuthCode) + 1)
        self.rpc_counts: dict[tuple[str, str], int] = {}
        self.ext_authz_http_answers: dict[int, int] = {}  # by HTTP status, bumped by service/ext_authz_http.py
        self.authorize_seconds = LoopHistogram(
            AUTHORIZE_SECONDS, "Authorize calls from the handler's start to its answer (or error), in seconds"
        )
        self.ext_authz_check_seconds = LoopHistogram(
            EXT_AUTHZ_CHECK_SECONDS,
            "Envoy ext_authz checks (gRPC Check calls and HTTP checks) from their arrival to their answer, in seconds",
        )
        self.verification_seconds = LoopHistogram(
            VERIFICATION_SECONDS,
            "cache misses: database read and argon2 verification, from the hand-off to the verification pool "
            "(including any wait for a free thread) to the result, in seconds",
            SLOW_BUCKETS,
        )
        self._cache: Any = None
        self._denials: Any = None
        self._hasher: Any = None
        self._in_flight: Callable[[], int] = lambda: 0
        self._budget: Any = None
        self._queue: Any = None
        self._streams: Any = None
        self.registry.register(self)
        ProcessCollector(registry=self.registry)
        GCCollector(registry=self.registry)

    def watch(
        self,
        *,
        cache: Any,
        hasher: Any,
        in_flight: Callable[[], int],
        denials: Any = None,
        budget: Any = None,
        queue: Any = None,
        streams: Any = None,
    ) -> None:
        """The objects read at scrape time: the VerifiedKeyCache (its CacheStats and size), the
        SecretHasher (its verification count), how many verifications are in flight, the lifecycle's
        DenialThrottle (refusals left out of the audit log), the FailureBudget and the FairQueue (their
        refusals; the queue's length), and the ChangeStreams (how many are open)."""
        self._cache, self._hasher, self._in_flight, self._denials = cache, hasher, in_flight, denials
        self._budget, self._queue, self._streams = budget, queue, streams

    def collect(self) -> Iterator[Metric]:
        decisions = CounterMetricFamily(
            _base(AUTHORIZE_DECISIONS),
            "Authorize decisions (also those of the ext_authz Check) by code: OK or the reason for the denial",
            labels=["code"],
        )
        counts = list(self.decisions)
        for code in AuthCode:
            decisions.add_metric([code.name], counts[code])
        yield decisions
        yield self.authorize_seconds.family()
        yield self.ext_authz_check_seconds.family()
        rpcs = CounterMetricFamily(
            _base(RPCS),
            "ApiKeyService calls answered, by method and gRPC status code",
            labels=["method", "code"],
        )
        for (method, status), count in sorted(dict(self.rpc_counts).items()):
            rpcs.add_metric([method, status], count)
        yield rpcs
        answers = CounterMetricFamily(
            _base(EXT_AUTHZ_HTTP_ANSWERS), "Envoy ext_authz checks over HTTP answered, by HTTP status", labels=["status"]
        )
        for http_status, answered in sorted(dict(self.ext_authz_http_answers).items()):
            answers.add_metric([str(http_status)], answered)
        yield answers
        if self._cache is not None:
            stats = self._cache.stats
            for name, value, documentation in (
                (CACHE_HITS, stats.hits, "verified-key cache lookups that found a fresh entry"),
                (CACHE_MISSES, stats.misses, "verified-key cache lookups that found none (or a stale one)"),
                (CACHE_NEGATIVE_HITS, stats.negative_hits, "misses answered by the cache of unknown keys"),
                (
                    CACHE_STALE_HITS,
                    stats.stale_hits,
                    "checks answered from a verified key's entry while the database did not answer",
                ),
                (
                    CACHE_EVICTIONS,
                    stats.evictions,
                    "entries dropped to keep the cache within APIKEYD_CACHE_SIZE",
                ),
            ):
                yield CounterMetricFamily(_base(name), documentation, value=value)
            yield GaugeMetricFamily(CACHE_ENTRIES, "verified keys in the cache", value=len(self._cache))
        if self._hasher is not None:
            yield CounterMetricFamily(
                _base(ARGON2_VERIFICATIONS), "argon2 verifications run", value=self._hasher.verifications
            )
        if self._denials is not None:
            yield CounterMetricFamily(
                _base(AUDIT_DENIALS_SUPPRESSED),
                "refused calls not written to the audit log (at most one per key, method and rule per window)",
                value=self._denials.suppressed_total,
            )
        if self._budget is not None:
            yield CounterMetricFamily(
                _base(FAILURE_BUDGET_REFUSALS),
                "cold checks refused as NOT_FOUND without a database read or argon2: their lookup id had used up "
                "its wrong secrets for the window (APIKEYD_FAILURE_BUDGET)",
                value=self._budget.refusals,
            )
        if self._queue is not None:
            yield CounterMetricFamily(
                _base(VERIFICATION_QUEUE_REFUSALS),
                "cold checks answered UNAVAILABLE because APIKEYD_VERIFICATION_QUEUE of them were already waiting",
                value=self._queue.refusals,
            )
            yield GaugeMetricFamily(
                VERIFICATIONS_QUEUED, "cold checks waiting for a verification thread", value=self._queue.queued()
            )
        yield GaugeMetricFamily(
            VERIFICATIONS_IN_FLIGHT,
            "cache misses being verified (database read and argon2), including those waiting for a thread",
            value=self._in_flight(),
        )
        yield self.verification_seconds.family()
        if self._streams is not None:
            yield GaugeMetricFamily(
                CHANGE_STREAMS, "WatchApiKeyChanges streams open (client-side caches following changes)",
                value=len(self._streams),
            )


# --- the HTTP endpoint ----------------------------------------------------------------------------


def split_listen(listen: str) -> tuple[str, int]:
    """host:port, [v6]:port or :port (all interfaces) -> (host, port)."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{listen!r} is not host:port")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not logged."""


class MetricsEndpoint:
    """prometheus_client's WSGI app (text or OpenMetrics, gzip) on a threading HTTP server of its own, serving
    one registry at /metrics (and /). Built here rather than with start_http_server so that it stops within
    50 ms instead of its half-second poll."""

    _POLL = 0.05

    def __init__(self, registry: CollectorRegistry, listen: str) -> None:
        host, port = split_listen(listen)
        family, _, _, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]

        class Server(ThreadingWSGIServer):
            address_family = family

        self.listen = listen
        self._httpd = make_server(
            str(address[0]), port, make_wsgi_app(registry), Server, handler_class=_QuietHandler
        )
        self.port: int = self._httpd.server_port
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": self._POLL},
            name="metrics",
            daemon=True,
        )
        self._thread.start()

    def close(self) -> None:
        """Blocks for up to one poll interval: call it off the event loop."""
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)
