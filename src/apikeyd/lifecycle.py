"""Key lifecycle: the management use cases. Validates with the domain, writes through the repository on
the store's thread pool, and drops the key from this process's cache before returning, so that every
change is in force for the next Authorize here."""

import asyncio
import uuid
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, TypeVar

from apikeyd.authorizer.authorizer import Authorizer
from apikeyd.authorizer.hashing import SecretHasher
from apikeyd.domain import keys, listing
from apikeyd.domain.errors import Aborted, FailedPrecondition, InvalidArgument
from apikeyd.domain.model import (
    ApiKey,
    Credentials,
    EventKind,
    KeyState,
    RateLimit,
    validate_description,
    validate_display_name,
    validate_expire_time,
    validate_grace,
    validate_labels,
    validate_project_id,
    validate_rate_limits,
    validate_reason,
)
from apikeyd.domain.scopes import validate_scopes
from apikeyd.store.repository import Change, Repository

T = TypeVar("T")

UPDATABLE = ("display_name", "description", "scopes", "labels", "expire_time", "rate_limits", "state")
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


@dataclass(frozen=True)
class KeyPrefixes:
    account: str = "AK_"
    project: str = "AKP_"

    def for_key(self, project_id: str) -> str:
        return self.project if project_id else self.account


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _validate_update(values: dict[str, Any], now: datetime) -> dict[str, Any]:
    checks: dict[str, Callable[[Any], Any]] = {
        "display_name": validate_display_name,
        "description": validate_description,
        "scopes": validate_scopes,
        "labels": validate_labels,
        "expire_time": lambda v: validate_expire_time(v, now),
        "rate_limits": validate_rate_limits,
        "state": lambda v: v,
    }
    unknown = sorted(set(values) - set(checks))
    if unknown:
        raise InvalidArgument(
            "update_mask", f"cannot update {', '.join(unknown)}; updatable fields: {', '.join(UPDATABLE)}"
        )
    if "state" in values and values["state"] not in (KeyState.ACTIVE, KeyState.DISABLED):
        raise InvalidArgument("state", "can only be set to ACTIVE or DISABLED; use RevokeApiKey to revoke")
    return {name: checks[name](value) for name, value in values.items()}


class KeyManager:
    def __init__(
        self,
        repository: Repository,
        hasher: SecretHasher,
        authorizer: Authorizer,
        store_executor: Executor,
        prefixes: KeyPrefixes = KeyPrefixes(),
    ) -> None:
        self._repository = repository
        self._hasher = hasher
        self._authorizer = authorizer
        self._executor = store_executor
        self._prefixes = prefixes

    async def _run(self, call: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    async def _retrying(self, call: Callable[[], T], etag: str) -> T:
        """Without an etag the caller asked for last-writer-wins, so a lost race is retried, not reported."""
        for attempt in range(_CONFLICT_RETRIES):
            try:
                return await self._run(call)
            except Aborted:
                if etag or attempt == _CONFLICT_RETRIES - 1:
                    raise
        raise AssertionError("unreachable")

    # --- reads ------------------------------------------------------------------------------------

    async def get(self, account_id: str, key_id: str) -> ApiKey:
        return await self._run(lambda: self._repository.get(account_id, key_id))

    async def list(
        self, account_id: str, filter_text: str, page_size: int, page_token: str
    ) -> tuple[list[ApiKey], str, int]:
        flt = listing.parse_filter(filter_text)
        size = listing.validate_page_size(page_size)
        after = listing.decode_page_token(page_token, account_id, filter_text) if page_token else None

        def read() -> tuple[list[ApiKey], bool, int]:
            page, more = self._repository.list_keys(account_id, flt, size, after)
            return page, more, self._repository.count_keys(account_id, flt)

        page, more, total = await self._run(read)
        token = (
            listing.encode_page_token(account_id, filter_text, (page[-1].create_time, page[-1].key_id))
            if more
            else ""
        )
        return page, token, total

    # --- writes -----------------------------------------------------------------------------------

    async def create(self, account_id: str, new: NewKey) -> tuple[ApiKey, str]:
        now = _now()
        project_id = validate_project_id(new.project_id)
        prefix = self._prefixes.for_key(project_id)
        secret, parsed = keys.generate(prefix, keys.new_lookup_id())
        key = ApiKey(
            key_id=str(uuid.uuid4()),
            account_id=account_id,
            project_id=project_id,
            display_name=validate_display_name(new.display_name),
            description=validate_description(new.description),
            scopes=validate_scopes(new.scopes),
            labels=validate_labels(new.labels),
            state=KeyState.ACTIVE,
            prefix=prefix,
            lookup_id=parsed.lookup_id,
            masked_key=keys.mask(secret),
            expire_time=validate_expire_time(new.expire_time, now),
            rate_limits=validate_rate_limits(list(new.rate_limits)),
            create_time=now,
            update_time=now,
            revision=1,
        )
        created = await self._run(
            lambda: self._repository.create(key, Credentials(self._hasher.hash(parsed.secret)))
        )
        return created, secret

    async def update(self, account_id: str, key_id: str, values: dict[str, Any], etag: str) -> ApiKey:
        now = _now()
        values = _validate_update(values, now)

        def decide(current: ApiKey, _: Credentials) -> Change:
            if current.state is KeyState.REVOKED:
                raise FailedPrecondition("the key is revoked; a revoked key cannot be changed")
            changed = {name: v for name, v in values.items() if getattr(current, name) != v}
            kind = EventKind.UPDATED
            if "state" in changed:
                kind = EventKind.DISABLED if changed["state"] is KeyState.DISABLED else EventKind.ENABLED
            return Change(kind, changed, tuple(changed))

        return await self._mutate(
            lambda: self._repository.modify(account_id, key_id, etag, decide, now), etag
        )

    async def revoke(self, account_id: str, key_id: str, reason: str, etag: str) -> ApiKey:
        now = _now()
        reason = validate_reason(reason)

        def decide(current: ApiKey, _: Credentials) -> Change:
            if current.state is KeyState.REVOKED:
                raise FailedPrecondition(f"the key was already revoked at {current.revoke_time:%Y-%m-%dT%H:%M:%SZ}")
            values = {"state": KeyState.REVOKED, "revoke_time": now, "revoke_reason": reason}
            return Change(EventKind.REVOKED, values, ("state", "revoke_time", "revoke_reason"), {"reason": reason})

        return await self._mutate(lambda: self._repository.modify(account_id, key_id, etag, decide, now), etag)

    async def delete(self, account_id: str, key_id: str, etag: str) -> ApiKey:
        return await self._mutate(lambda: self._repository.delete(account_id, key_id, etag, _now()), etag)

    async def rotate(self, account_id: str, key_id: str, grace: timedelta, etag: str) -> tuple[ApiKey, str]:
        now = _now()
        grace = validate_grace(grace)
        previous_expire = now + grace
        generated: list[str] = []

        def rotate() -> ApiKey:
            # Prefix and lookup id never change, so the new secret and its (slow) hash are made before the
            # write transaction rather than while it holds the lock.
            current = self._repository.get(account_id, key_id)
            secret, parsed = keys.generate(current.prefix, current.lookup_id)
            secret_hash = self._hasher.hash(parsed.secret)

            def decide(current: ApiKey, credentials: Credentials) -> Change:
                if current.state is KeyState.REVOKED:
                    raise FailedPrecondition("the key is revoked; a revoked key cannot be rotated")
                values = {
                    "secret_hash": secret_hash,
                    "previous_secret_hash": credentials.secret_hash,
                    "previous_secret_expire_time": previous_expire,
                    "masked_key": keys.mask(secret),
                }
                details = {"grace_seconds": grace.total_seconds()}
                return Change(EventKind.ROTATED, values, ("secret", "previous_secret_expire_time"), details)

            rotated = self._repository.modify(account_id, key_id, etag, decide, now)
            generated[:] = [secret]
            return rotated

        rotated = await self._mutate(rotate, etag)
        return rotated, generated[0]

    async def _mutate(self, call: Callable[[], ApiKey], etag: str) -> ApiKey:
        key = await self._retrying(call, etag)
        self._authorizer.invalidate(key)
        return key
