"""Key lifecycle: the management use cases. Each takes the authenticated Caller, checks its rights with the
domain's access rules (recording a refusal in the audit log), writes through the repository on the store's
thread pool, and drops the key from this process's cache before returning, so that every change is in
force for the next Authorize here."""

import asyncio
import contextlib
import contextvars
import dataclasses
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from apikeyd.authorizer.authorizer import Authorizer
from apikeyd.authorizer.hashing import SecretHasher
from apikeyd.denials import DenialKey, DenialThrottle
from apikeyd.domain import decide, keys, listing, updates
from apikeyd.domain.access import AUTHORIZE, READ, WRITE, Actor, Caller
from apikeyd.domain.credits import Credits, set_at, validate_credits
from apikeyd.domain.decision import Decision
from apikeyd.domain.errors import (
    Aborted,
    FailedPrecondition,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
    key_not_found,
)
from apikeyd.domain.ip_ranges import grpc_peer_host, validate_ranges
from apikeyd.domain.model import (
    REQUEST_ID_LIFETIME,
    ApiKey,
    AuditEvent,
    Credentials,
    EventKind,
    IdempotentRequest,
    KeyState,
    RateLimit,
    key_name,
    request_id_reused,
    validate_description,
    validate_display_name,
    validate_end_grace_after_unused,
    validate_expire_time,
    validate_grace,
    validate_labels,
    validate_project_id,
    validate_rate_limits,
    validate_reason,
)
from apikeyd.domain.scopes import validate_scopes
from apikeyd.logs import fields
from apikeyd.store.repository import Change, Repository

log = logging.getLogger(__name__)
T = TypeVar("T")

_CONFLICT_RETRIES = 3



@dataclass(frozen=True)
class NewKey:
    display_name: str
    scopes: tuple[str, ...]
    project_id: str = ""
    description: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    expire_time: datetime | None = None
    rate_limits: tuple[RateLimit, ...] = ()
    credits: Credits | None = None
    allowed_ip_ranges: tuple[str, ...] = ()


@dataclass(frozen=True)
class KeyPrefixes:
    account: str = "AK_"
    project: str = "AKP_"

    def for_key(self, project_id: str) -> str:
        return self.project if project_id else self.account


@dataclass(frozen=True)
class IssuedKey:
    """A created or rotated key with its secret; on a retry (same request_id) the secret is empty."""

    key: ApiKey
    secret: str
    replayed: bool = False


def _now() -> datetime:
    return datetime.now(UTC)


def _log_change(what: str, key: ApiKey, actor: Actor, event: str, **details: Any) -> None:
    """One line per committed change (JSON fields: apikeyd.logs); never a secret or a hash."""
    log.info(
        "%s %s (%s, %s) by %s from %s",
        what, key.name, key.masked_key, key.state.value, actor.name or "admin-key", actor.peer or "-",
        extra=fields(
            event=event,
            key=key.name,
            account=key.account_id,
            project=key.project_id,
            masked_key=key.masked_key,
            state=key.state.value,
            actor=actor.name or "admin-key",
            actor_key_id=actor.key_id,
            peer=actor.peer,
            method=actor.method,
            **details,
        ),
    )


def _retrieved(task: "asyncio.Task[Any]") -> None:
    """A commit whose caller has gone: its error has nobody to re-raise it and must not be logged as lost."""
    if not task.cancelled():
        task.exception()


class KeyManager:
    def __init__(
        self,
        repository: Repository,
        hasher: SecretHasher,
        authorizer: Authorizer,
        store_executor: Executor,
        prefixes: KeyPrefixes = KeyPrefixes(),
        operator_account: str = "system",
        max_live_keys: int = 1000,
        denials: DenialThrottle | None = None,
    ) -> None:
        self._repository = repository
        self._hasher = hasher
        self._authorizer = authorizer
        self._executor = store_executor
        self._prefixes = prefixes
        self.operator_account = operator_account
        self._max_live_keys = max_live_keys
        self.denials = denials if denials is not None else DenialThrottle()
        self._page_token_key: bytes | None = None  # signs page tokens (domain/listing.py)
        # Told after every committed change, once this process's cache has dropped the key: the change feed,
        # which reads at once, so change streams carry a change made here without waiting for its next poll.
        self.committed: Callable[[], None] = lambda: None

    async def page_token_key(self) -> bytes:
        """Read once, by the first listing: migration 0005 made it, and `serve` checks the schema at start."""
        if self._page_token_key is None:
            self._page_token_key = await self.run(self._repository.page_token_key)
        return self._page_token_key

    async def run(self, call: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    async def _retrying(self, call: Callable[[], T], etag: str) -> T:
        """Without an etag the caller asked for last-writer-wins, so a lost race is retried, not reported."""
        for attempt in range(_CONFLICT_RETRIES):
            try:
                return await self.run(call)
            except Aborted:
                if etag or attempt == _CONFLICT_RETRIES - 1:
                    raise
        raise AssertionError("unreachable")

    async def _committing(self, call: Callable[[], T], etag: str, changed: Callable[[T], ApiKey | None]) -> T:
        """`_retrying`, then the invalidation of the key `changed` names, in a task the caller cannot cancel.
        A caller that goes away (its deadline, a cancel, the shutdown grace) while the write runs does not
        stop its commit, and the change feed skips this process's own events: without this, the old row
        stayed in this process's cache until its TTL. In a context of its own, as it may outlive the call."""

        async def commit() -> T:
            result = await self._retrying(call, etag)
            key = changed(result)
            if key is not None:
                self._authorizer.invalidate(key)
                self.committed()
            return result

        task = asyncio.get_running_loop().create_task(commit(), context=contextvars.Context())
        task.add_done_callback(_retrieved)
        return await asyncio.shield(task)

    # --- callers ----------------------------------------------------------------------------------

    async def authenticate(self, token: str, peer: str, method: str) -> Caller:
        """The caller behind a bearer key, through the same cache and checks as Authorize."""
        found = await self._authorizer.identify(token)
        if isinstance(found, Decision):
            raise Unauthenticated(f"the bearer key is not usable: {found.message}")
        if found.key.ip_ranges:  # a key kept to its ranges is kept to them for managing keys too
            outside = decide.outside_ranges(found, grpc_peer_host(peer))
            if outside is not None:
                raise Unauthenticated(f"the bearer key is not usable from here: {outside.message}")
        return Caller(found.key, found.scopes, found.key.account_id == self.operator_account, peer, method)

    async def watcher(self, token: str, peer: str) -> Caller:
        """A caller of WatchApiKeyChanges: a key with apikeys:authorize; a refusal is audited like any."""
        caller = await self.authenticate(token, peer, "WatchApiKeyChanges")
        if not caller.may(AUTHORIZE):  # the audited path only for a refusal: streams recheck every second
            async with self._denials(caller, f"accounts/{caller.account_id}"):
                caller.require(AUTHORIZE)
        return caller

    def operator(self, method: str) -> Caller:
        """The operator acting through the command line on the database itself."""
        return Caller(None, None, True, "", method)

    @contextlib.asynccontextmanager
    async def _denials(self, caller: Caller, target: str, key_id: str = "") -> AsyncIterator[None]:
        """Record a refusal in the caller's own audit log (at most one per DenialThrottle window for the same
        key, method and rule, with the count of those left out), then let it reach the caller."""
        try:
            yield
        except PermissionDenied as denied:
            if caller.key is not None:
                reason = str(denied)
                rule = getattr(denied, "rule", "")
                throttled: DenialKey = (caller.key.key_id, caller.method, rule)
                suppressed = self.denials.admit(throttled)
                log.info(
                    "denied %s on %s to key %s: %s", caller.method, target, caller.key.key_id, reason,
                    extra=fields(
                        event="access.denied",
                        target=target,
                        reason=reason,
                        account=caller.account_id,
                        project=caller.project_id,
                        actor=caller.key.name,
                        actor_key_id=caller.key.key_id,
                        peer=caller.peer,
                        method=caller.method,
                        rule=rule,
                        audited=suppressed is not None,
                    ),
                )
                if suppressed is not None:
                    actor = caller.actor
                    details: dict[str, Any] = {"reason": reason, "target": target}
                    if suppressed:
                        details["suppressed"] = suppressed
                    try:
                        await self.run(
                            lambda: self._repository.record_denial(
                                caller.account_id, caller.project_id, actor, key_id, details, _now()
                            )
                        )
                    except Unavailable:
                        self.denials.unrecorded(throttled, suppressed)
                        log.warning("could not write the audit event of a denial: the database is unavailable")
            raise

    async def require_read(self, caller: Caller, account_id: str, target: str, key_id: str = "") -> None:
        """The rights every read checks (apikeys:read, the caller's account), a refusal audited."""
        async with self._denials(caller, target, key_id):
            caller.require(READ)
            caller.check_account(account_id)

    def _reached(self, caller: Caller, key: ApiKey) -> ApiKey:
        if not caller.reaches(key):
            raise key_not_found(key.account_id, key.key_id)
        return key

    async def forget_old_request_ids(self) -> int:
        """Housekeeping: request_ids past their 24 hours would be ignored anyway."""
        return await self.run(lambda: self._repository.forget_request_ids(_now() - REQUEST_ID_LIFETIME))

    # --- reads ------------------------------------------------------------------------------------

    async def get(self, caller: Caller, account_id: str, key_id: str) -> ApiKey:
        await self.require_read(caller, account_id, key_name(account_id, key_id), key_id)
        return self._reached(caller, await self.run(lambda: self._repository.get(account_id, key_id)))

    async def list_keys(
        self, caller: Caller, account_id: str, filter_text: str, page_size: int, page_token: str
    ) -> tuple[list[ApiKey], str]:
        await self.require_read(caller, account_id, f"accounts/{account_id}")
        flt = listing.parse_filter(filter_text)
        size = listing.validate_page_size(page_size)
        after = listing.decode_page_token(await self.page_token_key(), page_token, account_id, filter_text) if page_token else None
        if caller.project_id:
            if flt.project_id not in (None, caller.project_id):
                return [], ""  # another project's keys are out of reach: as if there were none
            flt = dataclasses.replace(flt, project_id=caller.project_id)

        # `resume` is the last key the page examined: its last key, or with a `labels.` term that stopped at
        # the bound on keys examined, a later one; the page may then be short, even empty (AIP-158).
        page, resume = await self.run(lambda: self._repository.list_keys(account_id, flt, size, after))
        token = listing.encode_page_token(await self.page_token_key(), account_id, filter_text, resume) if resume is not None else ""
        return page, token

    async def list_events(
        self, caller: Caller, account_id: str, filter_text: str, page_size: int, page_token: str
    ) -> tuple[list[AuditEvent], str]:
        await self.require_read(caller, account_id, f"accounts/{account_id}")
        flt = listing.parse_event_filter(filter_text)
        size = listing.validate_page_size(page_size)
        before = listing.decode_event_page_token(await self.page_token_key(), page_token, account_id, filter_text) if page_token else None
        # `resume` is the last event the page examined; with a term checked row by row that stopped at the
        # bound on events examined, the page may be short, even empty (AIP-158).
        events, resume = await self.run(
            lambda: self._repository.list_events(account_id, caller.project_id, flt, size, before)
        )
        token = listing.encode_event_page_token(await self.page_token_key(), account_id, filter_text, resume) if resume is not None else ""
        return events, token

    # --- writes -----------------------------------------------------------------------------------

    async def create(self, caller: Caller, account_id: str, new: NewKey, request_id: str = "") -> IssuedKey:
        now = _now()
        async with self._denials(caller, f"accounts/{account_id}"):
            caller.require(WRITE)
            caller.check_account(account_id)
            project_id = caller.project_for_new_key(validate_project_id(new.project_id))
            scopes = validate_scopes(new.scopes)
            caller.check_grant(scopes)
        prefix = self._prefixes.for_key(project_id)
        secret, parsed = keys.generate(prefix, keys.new_lookup_id())
        key = ApiKey(
            key_id=str(uuid.uuid4()),
            account_id=account_id,
            project_id=project_id,
            display_name=validate_display_name(new.display_name),
            description=validate_description(new.description),
            scopes=scopes,
            labels=validate_labels(new.labels),
            state=KeyState.ACTIVE,
            prefix=prefix,
            lookup_id=parsed.lookup_id,
            masked_key=keys.mask(secret),
            expire_time=validate_expire_time(new.expire_time, now),
            rate_limits=validate_rate_limits(list(new.rate_limits)),
            credits=set_at(validate_credits(new.credits), now),
            allowed_ip_ranges=validate_ranges(new.allowed_ip_ranges),
            create_time=now,
            update_time=now,
            revision=1,
        )
        # The fingerprint holds the project the key gets, so a project key's request never matches another's.
        request = IdempotentRequest.of(
            request_id, "CreateApiKey", account_id, dataclasses.asdict(dataclasses.replace(new, project_id=project_id))
        )
        actor = caller.actor
        # The limit guards against a tenant's runaway scripts; operators are not limited.
        limit = None if account_id == self.operator_account else self._max_live_keys
        created, replayed = await self.run(
            lambda: self._repository.create(
                key, Credentials(self._hasher.hash(parsed.secret)), actor, request, limit
            )
        )
        if replayed and not caller.reaches(created):
            raise request_id_reused()  # as for any other request that reuses an id: nothing about the key
        _log_change(
            "replayed create of" if replayed else "created", created, actor, "key.created", replayed=replayed
        )
        return IssuedKey(created, "" if replayed else secret, replayed)

    async def update(
        self, caller: Caller, account_id: str, key_id: str, values: dict[str, Any], etag: str, allow_self: bool = False
    ) -> ApiKey:
        now = _now()
        async with self._denials(caller, key_name(account_id, key_id), key_id):
            caller.require(WRITE)
            caller.check_account(account_id)
            values = updates.validate(values, now)
            if "scopes" in values:
                caller.check_grant(values["scopes"])

            def decide(current: ApiKey, _: Credentials) -> Change:
                self._reached(caller, current)
                caller.check_manage(current)
                caller.check_self_update(current, values, allow_self)  # on the row the write locks
                if current.state is KeyState.REVOKED:
                    raise FailedPrecondition("the key is revoked; a revoked key cannot be changed")
                changed, paths, details = updates.changes(current, values, now)
                kind = EventKind.UPDATED
                if "state" in changed:
                    kind = EventKind.DISABLED if changed["state"] is KeyState.DISABLED else EventKind.ENABLED
                return Change(kind, changed, paths, details)

            return await self.mutate(caller, account_id, key_id, etag, decide, now)

    async def revoke(
        self, caller: Caller, account_id: str, key_id: str, reason: str, etag: str, allow_self: bool = False
    ) -> ApiKey:
        now = _now()
        reason = validate_reason(reason)
        async with self._denials(caller, key_name(account_id, key_id), key_id):
            caller.require(WRITE)
            caller.check_account(account_id)

        def decide(current: ApiKey, _: Credentials) -> Change:
            self._reached(caller, current)
            caller.check_self(current, allow_self, "revoke")
            if current.state is KeyState.REVOKED:
                raise FailedPrecondition(f"the key was already revoked at {current.revoke_time:%Y-%m-%dT%H:%M:%SZ}")
            values = {"state": KeyState.REVOKED, "revoke_time": now, "revoke_reason": reason}
            return Change(EventKind.REVOKED, values, ("state", "revoke_time", "revoke_reason"), {"reason": reason})

        return await self.mutate(caller, account_id, key_id, etag, decide, now)

    async def delete(self, caller: Caller, account_id: str, key_id: str, etag: str, allow_self: bool = False) -> ApiKey:
        async with self._denials(caller, key_name(account_id, key_id), key_id):
            caller.require(WRITE)
            caller.check_account(account_id)

        def check(current: ApiKey) -> None:
            self._reached(caller, current)
            caller.check_self(current, allow_self, "delete")

        actor = caller.actor
        key = await self._committing(
            lambda: self._repository.delete(account_id, key_id, etag, _now(), actor, check), etag, lambda key: key
        )
        _log_change("deleted", key, actor, "key.deleted")
        return key

    async def rotate(
        self,
        caller: Caller,
        account_id: str,
        key_id: str,
        grace: timedelta,
        etag: str,
        request_id: str = "",
        allow_self: bool = False,
        end_grace_after_unused: timedelta | None = None,
    ) -> IssuedKey:
        now = _now()
        grace = validate_grace(grace)
        end_after = validate_end_grace_after_unused(end_grace_after_unused, grace)
        request = IdempotentRequest.of(
            request_id, "RotateApiKey", account_id, key_id, grace.total_seconds(),
            None if end_after is None else end_after.total_seconds(),
        )

        def may_rotate(current: ApiKey) -> ApiKey:
            self._reached(caller, current)
            caller.check_manage(current)
            caller.check_self(current, allow_self, "rotate")
            return current

        def decide(current: ApiKey, credentials: Credentials) -> Change:
            may_rotate(current)  # again, on the row the write locks: the key may have gained scopes since
            if current.state is KeyState.REVOKED:
                raise FailedPrecondition("the key is revoked; a revoked key cannot be rotated")
            values = {
                "secret_hash": secret_hash,
                "previous_secret_hash": credentials.secret_hash,
                "previous_secret_expire_time": now + grace,
                "masked_key": keys.mask(secret),
                # The previous secret's uses start afresh: it is another secret than the last rotation's.
                "previous_secret_last_used_time": None,
                "end_grace_after_unused": end_after,
            }
            details: dict[str, Any] = {"grace_seconds": grace.total_seconds()}
            if end_after is not None:
                details["end_grace_after_unused_seconds"] = end_after.total_seconds()
            return Change(EventKind.ROTATED, values, ("secret", "previous_secret_expire_time"), details)

        actor = caller.actor
        async with self._denials(caller, key_name(account_id, key_id), key_id):
            caller.require(WRITE)
            caller.check_account(account_id)
            # Prefix and lookup id never change, so the new secret and its (slow) hash are made before the
            # write transaction rather than while it holds the lock; a caller without the right is refused
            # before paying for the hash.
            current = may_rotate(await self.run(lambda: self._repository.get(account_id, key_id)))
            secret, parsed = keys.generate(current.prefix, current.lookup_id)
            secret_hash = await self.run(lambda: self._hasher.hash(parsed.secret))
            rotated, replayed = await self._committing(
                lambda: self._repository.modify(account_id, key_id, etag, decide, now, actor, request),
                etag,
                lambda outcome: None if outcome[1] else outcome[0],
            )
        _log_change(
            "replayed rotation of" if replayed else "rotated", rotated, actor, "key.rotated", replayed=replayed
        )
        return IssuedKey(rotated, "" if replayed else secret, replayed)

    async def mutate(
        self,
        caller: Caller,
        account_id: str,
        key_id: str,
        etag: str,
        decide: Callable[[ApiKey, Credentials], Change],
        now: datetime,
    ) -> ApiKey:
        actor = caller.actor
        decided: list[Change] = []  # what the committed attempt decided, for its log line

        def recorded(current: ApiKey, credentials: Credentials) -> Change:
            decided.append(decide(current, credentials))
            return decided[-1]

        key, _ = await self._committing(
            lambda: self._repository.modify(account_id, key_id, etag, recorded, now, actor), etag, lambda outcome: outcome[0]
        )
        kind = decided[-1].kind.value if decided else "changed"
        changed = list(decided[-1].changed_fields) if decided else []
        _log_change(kind, key, actor, f"key.{kind}", changed_fields=changed)
        return key
