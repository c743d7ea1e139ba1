"""The repository: every read and write of keys and events, each call one transaction."""

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, Select, and_, delete, func, or_, select, text, tuple_, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, aliased, sessionmaker

from apikeyd.domain.access import Actor
from apikeyd.domain.credits import Credits
from apikeyd.domain.echo import quote
from apikeyd.domain.errors import (
    Aborted,
    FailedPrecondition,
    ResourceExhausted,
    key_not_found,
)
from apikeyd.domain.listing import EventFilter, Filter, max_rows_examined
from apikeyd.domain.model import (
    REQUEST_ID_LIFETIME,
    ApiKey,
    AuditEvent,
    Credentials,
    EventKind,
    IdempotentRequest,
    KeyState,
    RateLimit,
    request_id_reused,
)
from apikeyd.store.engine import WRITE, create_db_engine, database_errors
from apikeyd.store.models import (
    ApiKeyRow,
    KeyEventRow,
    RequestIdRow,
    ServerSecretRow,
    credits_from_columns,
    refill_to_json,
)

FEED_CHANNEL = "apikeyd_key_events"  # NOTIFY channel of committed key events (PostgreSQL)


@dataclass(frozen=True)
class Change:
    """What a mutation sets on a key, and what its event row says."""

    kind: EventKind
    values: dict[str, Any]
    changed_fields: tuple[str, ...]
    details: dict[str, Any] = field(default_factory=dict)


def _to_domain(row: ApiKeyRow) -> ApiKey:
    return ApiKey(
        key_id=row.key_id,
        account_id=row.account_id,
        project_id=row.project_id,
        display_name=row.display_name,
        description=row.description,
        scopes=tuple(row.scopes),
        labels=dict(row.labels),
        state=KeyState(row.state),
        prefix=row.prefix,
        lookup_id=row.lookup_id,
        masked_key=row.masked_key,
        expire_time=row.expire_time,
        rate_limits=tuple(RateLimit(limit, period) for limit, period in row.rate_limits),
        create_time=row.create_time,
        update_time=row.update_time,
        revision=row.revision,
        last_used_time=row.last_used_time,
        revoke_time=row.revoke_time,
        revoke_reason=row.revoke_reason,
        previous_secret_expire_time=row.previous_secret_expire_time,
        credits=credits_from_columns(row.credits_remaining, row.credits_refill, row.credits_next_refill),
        allowed_ip_ranges=tuple(row.allowed_ip_ranges or ()),
        previous_secret_last_used_time=row.previous_secret_last_used_time,
        end_grace_after_unused=(
            None if row.end_grace_after_unused_seconds is None else timedelta(seconds=row.end_grace_after_unused_seconds)
        ),
    )


def _to_columns(values: dict[str, Any]) -> dict[str, Any]:
    columns = dict(values)
    if "credits" in columns:  # whole, with its next refill decided (lifecycle, domain/updates.py)
        credits: Credits | None = columns.pop("credits")
        columns["credits_remaining"] = None if credits is None else credits.remaining
        columns["credits_refill"] = refill_to_json(None if credits is None else credits.refill)
        columns["credits_next_refill"] = None if credits is None else credits.next_refill
    if "allowed_ip_ranges" in columns:
        columns["allowed_ip_ranges"] = list(columns["allowed_ip_ranges"])
    if "end_grace_after_unused" in columns:
        grace: timedelta | None = columns.pop("end_grace_after_unused")
        columns["end_grace_after_unused_seconds"] = None if grace is None else int(grace.total_seconds())
    if "state" in columns:
        columns["state"] = columns["state"].value
    if "rate_limits" in columns:
        columns["rate_limits"] = [[r.limit, r.period_seconds] for r in columns["rate_limits"]]
    if "scopes" in columns:  # a tuple in the domain, a JSON list here
        columns["scopes"] = list(columns["scopes"])
    return columns


_COMPARE: dict[str, Callable[[Any, datetime], Any]] = {
    "=": lambda column, when: column == when,
    ">": lambda column, when: column > when,
    ">=": lambda column, when: column >= when,
    "<": lambda column, when: column < when,
    "<=": lambda column, when: column <= when,
}


def _actor_columns(actor: Actor) -> dict[str, str]:
    return {
        "actor_key_id": actor.key_id,
        "actor_name": actor.name,
        "actor_display_name": actor.display_name[:255],
        "peer": actor.peer[:128],
        "method": actor.method,
    }


def _event_checks(events: Any, flt: EventFilter) -> list[Any]:
    """The conditions of an audit-event listing that no index serves, on `events` (the table or a subquery
    of it): checked row by row, so list_events bounds the rows it walks when there are any."""
    checks: list[Any] = []
    if flt.kind is not None:
        checks.append(events.kind == flt.kind.value)
    if flt.actor_key_id is not None:
        checks.append(events.actor_key_id == flt.actor_key_id)
    for operator, when in flt.times:
        checks.append(_COMPARE[operator](events.time, when))
    return checks


def _event_to_domain(row: KeyEventRow) -> AuditEvent:
    return AuditEvent(
        event_id=row.id,
        kind=row.kind,
        time=row.time,
        key_id=row.key_id,
        account_id=row.account_id,
        project_id=row.project_id,
        actor_key_id=row.actor_key_id,
        actor_name=row.actor_name,
        actor_display_name=row.actor_display_name,
        peer=row.peer,
        method=row.method,
        changed_fields=tuple(row.changed_fields),
        details=dict(row.details),
    )


class Repository:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._read = sessionmaker(engine, expire_on_commit=False)
        self._write = sessionmaker(engine.execution_options(**{WRITE: True}), expire_on_commit=False)

    @classmethod
    def from_url(cls, url: str, pool_size: int = 5) -> "Repository":
        return cls(create_db_engine(url, pool_size))

    def close(self) -> None:
        self.engine.dispose()

    @contextlib.contextmanager
    def _transaction(self, write: bool) -> Iterator[Session]:
        with database_errors(), (self._write if write else self._read).begin() as session:
            yield session

    def session(self, write: bool) -> contextlib.AbstractContextManager[Session]:
        """One transaction, for the store's other modules (credits.py, usage.py): the same errors and locks."""
        return self._transaction(write)

    def ping(self) -> None:
        with self._transaction(write=False) as session:
            session.execute(select(1))

    def page_token_key(self) -> bytes:
        """The key page tokens are signed with, the same for every replica (made by migration 0005)."""
        with self._transaction(write=False) as session:
            value = session.scalar(select(ServerSecretRow.value).where(ServerSecretRow.name == "page_token"))
        if value is None:
            raise LookupError("the database has no page-token key: run `apikeyd migrate`")
        return bytes.fromhex(value)

    # --- reads ------------------------------------------------------------------------------------

    def get(self, account_id: str, key_id: str) -> ApiKey:
        with self._transaction(write=False) as session:
            return _to_domain(self._row(session, account_id, key_id))

    def find_by_lookup_id(self, lookup_id: str) -> tuple[ApiKey, Credentials] | None:
        with self._transaction(write=False) as session:
            row = session.scalars(select(ApiKeyRow).where(ApiKeyRow.lookup_id == lookup_id)).one_or_none()
            if row is None:
                return None
            return _to_domain(row), Credentials(row.secret_hash, row.previous_secret_hash)

    def list_keys(
        self, account_id: str, flt: Filter, page_size: int, after: tuple[datetime, str] | None
    ) -> tuple[list[ApiKey], tuple[datetime, str] | None]:
        """One page in (create_time, key_id) order, keyset on the indexes, never OFFSET; and the position the
        next page starts after, None when no more follow. Only `labels.` terms are checked key by key, so
        only they bound the walk (_walk_page); the key a position may then name is one the caller may list
        anyway, since a project key's project is part of the filter's index."""
        query = self._filtered(select(ApiKeyRow), account_id, flt)
        if after is not None:
            query = query.where(tuple_(ApiKeyRow.create_time, ApiKeyRow.key_id) > tuple_(*after))
        rows, resume = self._walk_page(
            query,
            ApiKeyRow,
            lambda key: (key.create_time, key.key_id),
            lambda key: [key.labels[label].as_string() == value for label, value in flt.labels],
            page_size,
        )
        return [_to_domain(row) for row in rows], None if resume is None else (resume.create_time, resume.key_id)

    def events(self, after_id: int = 0, limit: int = 1000) -> list[AuditEvent]:
        """Every event after `after_id`, oldest first: the change feed."""
        with self._transaction(write=False) as session:
            query = select(KeyEventRow).where(KeyEventRow.id > after_id).order_by(KeyEventRow.id).limit(limit)
            return [_event_to_domain(row) for row in session.scalars(query).all()]

    def list_events(
        self, account_id: str, project_id: str, flt: EventFilter, page_size: int, before_id: int | None
    ) -> tuple[list[AuditEvent], int | None]:
        """One page of an account's events, newest first (keyset on the id); only one project's when given;
        and the id the next page starts below, None when no more follow. The account, a project key's
        project, the key_id and the position are served by indexes; kind, actor_key_id and event_time terms
        are checked row by row and bound the walk (_walk_page)."""
        query = select(KeyEventRow).where(KeyEventRow.account_id == account_id)
        if project_id:
            query = query.where(KeyEventRow.project_id == project_id)
        if flt.key_id is not None:
            query = query.where(KeyEventRow.key_id == flt.key_id)
        if before_id is not None:
            query = query.where(KeyEventRow.id < before_id)
        rows, resume = self._walk_page(
            query, KeyEventRow, lambda event: (event.id.desc(),), lambda event: _event_checks(event, flt), page_size
        )
        return [_event_to_domain(row) for row in rows], None if resume is None else resume.id

    def _walk_page(
        self,
        query: Select[Any],
        entity: Any,
        order: Callable[[Any], tuple[Any, ...]],
        checks: Callable[[Any], list[Any]],
        page_size: int,
    ) -> tuple[list[Any], Any]:
        """One page of `query` (rows of `entity`, already narrowed by what the indexes serve and the page
        token's position) in `order`, with the row the next page starts after, None when no more follow.

        With no `checks` every row the index yields matches. With some, they are checked row by row, so the
        walk stops after max_rows_examined(page_size) rows (listing.ROWS_EXAMINED_PER_RESULT): the next `bound`
        rows in order (and one more, to tell whether any follow) are numbered, and only the ones that pass the
        checks, and the last one examined, come back, in one statement (one snapshot). A page that reaches the
        bound before it is full holds what matched so far, possibly nothing, and the next page resumes the
        walk after the last row examined. The ROWS frame lets PostgreSQL number a row without reading ahead for
        its peers, so the index yields exactly bound + 1 rows; neither backend sorts more than those.
        `order` and `checks` take the entity or its alias in the walk's subquery."""
        if not checks(entity):
            with self._transaction(write=False) as session:
                rows = session.scalars(query.order_by(*order(entity)).limit(page_size + 1)).all()
            page = list(rows[:page_size])
            return page, page[-1] if len(rows) > page_size else None

        bound = max_rows_examined(page_size)
        scanned = (
            query.add_columns(func.row_number().over(order_by=order(entity), rows=(None, 0)).label("n"))
            .order_by(*order(entity))
            .limit(bound + 1)
            .subquery("scanned")
        )
        row_in_scan = aliased(entity, scanned)
        matched = and_(*checks(row_in_scan))
        outer = (
            select(row_in_scan, scanned.c.n, matched.label("matched"))
            .where(or_(matched, scanned.c.n >= bound))
            .order_by(*order(row_in_scan))
            .limit(page_size + 2)
        )
        with self._transaction(write=False) as session:
            walked = session.execute(outer).all()
        hits = [row for row, n, hit in walked if hit and n <= bound]
        if len(hits) > page_size:  # the page filled before the bound: the next starts after its last row
            page = hits[:page_size]
            return page, page[-1]
        last = next((row for row, n, _ in walked if n == bound), None)
        more = any(n > bound for _, n, _ in walked)
        return hits, last if more else None

    # --- writes -----------------------------------------------------------------------------------

    def create(
        self,
        key: ApiKey,
        credentials: Credentials,
        actor: Actor,
        request: IdempotentRequest | None = None,
        max_live_keys: int | None = None,
    ) -> tuple[ApiKey, bool]:
        """The new key, or with a request_id seen in the last day the key it made; and whether it was that."""
        return self._or_replay(
            lambda: self._create(key, credentials, actor, request, max_live_keys),
            request,
            key.account_id,
            key.create_time,
        )

    def _create(
        self,
        key: ApiKey,
        credentials: Credentials,
        actor: Actor,
        request: IdempotentRequest | None,
        max_live_keys: int | None,
    ) -> tuple[ApiKey, bool]:
        row = ApiKeyRow(
            key_id=key.key_id,
            account_id=key.account_id,
            project_id=key.project_id,
            display_name=key.display_name,
            description=key.description,
            labels=key.labels,
            prefix=key.prefix,
            lookup_id=key.lookup_id,
            masked_key=key.masked_key,
            secret_hash=credentials.secret_hash,
            previous_secret_hash=None,
            previous_secret_expire_time=None,
            expire_time=key.expire_time,
            create_time=key.create_time,
            update_time=key.update_time,
            last_used_time=None,
            revoke_time=None,
            revoke_reason="",
            revision=key.revision,
            **_to_columns(
                {
                    "state": key.state,
                    "scopes": key.scopes,
                    "rate_limits": key.rate_limits,
                    "credits": key.credits,
                    "allowed_ip_ranges": key.allowed_ip_ranges,
                }
            ),
        )
        with self._transaction(write=True) as session:
            # First the account's lock: a retry racing the create it repeats must find that create's
            # request_id, not count its key against the limit.
            self._lock_account(session, key.account_id)
            if request is not None:
                replayed = self._replayed(session, request, key.account_id, key.create_time)
                if replayed is not None:
                    return replayed, True
            if max_live_keys is not None:
                self._check_live_keys(session, key.account_id, max_live_keys)
            session.add(row)
            self._add_event(session, key, EventKind.CREATED, key.create_time, actor, (), {})
            if request is not None:
                self._remember(session, request, key.account_id, key.key_id, key.create_time)
        return key, False

    def modify(
        self,
        account_id: str,
        key_id: str,
        expected_etag: str,
        decide: Callable[[ApiKey, Credentials], Change],
        now: datetime,
        actor: Actor,
        request: IdempotentRequest | None = None,
    ) -> tuple[ApiKey, bool]:
        """Apply what `decide` makes of the current key, guarded by the etag and the revision; with a
        request_id seen in the last day, change nothing and say so."""
        return self._or_replay(
            lambda: self._modify(account_id, key_id, expected_etag, decide, now, actor, request),
            request,
            account_id,
            now,
        )

    def _or_replay(
        self,
        write: Callable[[], tuple[ApiKey, bool]],
        request: IdempotentRequest | None,
        account_id: str,
        now: datetime,
    ) -> tuple[ApiKey, bool]:
        """Run `write`; if a concurrent request with the same request_id committed first (the unique key
        refused ours), answer as that request's retry."""
        try:
            return write()
        except IntegrityError:
            if request is None:
                raise
            with self._transaction(write=True) as session:
                replayed = self._replayed(session, request, account_id, now)
            if replayed is None:
                raise
            return replayed, True

    def _modify(
        self,
        account_id: str,
        key_id: str,
        expected_etag: str,
        decide: Callable[[ApiKey, Credentials], Change],
        now: datetime,
        actor: Actor,
        request: IdempotentRequest | None,
    ) -> tuple[ApiKey, bool]:
        with self._transaction(write=True) as session:
            if request is not None:
                replayed = self._replayed(session, request, account_id, now)
                if replayed is not None:
                    return replayed, True
            row = self._row(session, account_id, key_id, for_update=True)
            current = _to_domain(row)
            self._check_etag(current, expected_etag)
            change = decide(current, Credentials(row.secret_hash, row.previous_secret_hash))
            values = {**_to_columns(change.values), "update_time": now, "revision": current.revision + 1}
            result = session.execute(
                update(ApiKeyRow)
                .where(ApiKeyRow.key_id == key_id, ApiKeyRow.revision == current.revision)
                .values(**values)
            )
            if result.rowcount != 1:  # type: ignore[attr-defined]
                raise Aborted("the key changed while this call ran; get it again and retry")
            session.expire(row)
            updated = _to_domain(self._row(session, account_id, key_id))
            self._add_event(session, updated, change.kind, now, actor, change.changed_fields, change.details)
            if request is not None:
                self._remember(session, request, account_id, key_id, now)
            return updated, False

    def delete(
        self, account_id: str, key_id: str, expected_etag: str, now: datetime, actor: Actor, check: Callable[[ApiKey], None]
    ) -> ApiKey:
        """Delete the key if `check`, given the current key, raises nothing."""
        with self._transaction(write=True) as session:
            row = self._row(session, account_id, key_id, for_update=True)
            current = _to_domain(row)
            self._check_etag(current, expected_etag)
            check(current)
            session.delete(row)
            self._add_event(session, current, EventKind.DELETED, now, actor, (), {})
            return current

    def record_denial(
        self, account_id: str, project_id: str, actor: Actor, key_id: str, details: dict[str, Any], now: datetime
    ) -> None:
        """A refused management call, in the calling key's own account's audit log."""
        with self._transaction(write=True) as session:
            session.add(
                KeyEventRow(
                    key_id=key_id,
                    account_id=account_id,
                    project_id=project_id,
                    kind=EventKind.DENIED.value,
                    time=now,
                    changed_fields=[],
                    details=details,
                    **_actor_columns(actor),
                )
            )

    def forget_request_ids(self, before: datetime) -> int:
        """Drop request_ids past their lifetime; they would be ignored anyway."""
        with self._transaction(write=True) as session:
            result = session.execute(delete(RequestIdRow).where(RequestIdRow.create_time < before))
            return int(result.rowcount)  # type: ignore[attr-defined]

    def record_last_used(self, times: dict[str, datetime], previous: dict[str, datetime] | None = None) -> None:
        """Write a batch of last-used times, and of the previous secret's last uses during a rotation's
        grace; a time never replaces a newer one another process wrote."""
        if not times:
            return
        with self._transaction(write=True) as session:
            for column, batch in ((ApiKeyRow.last_used_time, times), (ApiKeyRow.previous_secret_last_used_time, previous or {})):
                for key_id, used in batch.items():
                    session.execute(
                        update(ApiKeyRow)
                        .where(ApiKeyRow.key_id == key_id, (column.is_(None)) | (column < used))
                        .values({column.key: used})
                        .execution_options(synchronize_session=False)
                    )

    # --- helpers ----------------------------------------------------------------------------------

    @staticmethod
    def _row(session: Session, account_id: str, key_id: str, for_update: bool = False) -> ApiKeyRow:
        query = select(ApiKeyRow).where(ApiKeyRow.key_id == key_id, ApiKeyRow.account_id == account_id)
        if for_update:
            query = query.with_for_update()
        row = session.scalars(query).one_or_none()
        if row is None:
            raise key_not_found(account_id, key_id)
        return row

    @staticmethod
    def _check_etag(current: ApiKey, expected_etag: str) -> None:
        if expected_etag and expected_etag != current.etag:
            raise Aborted(
                f"etag {quote(expected_etag)} does not match the key's current etag {current.etag}; "
                "get the key again and retry"
            )

    @staticmethod
    def _filtered(query: Any, account_id: str, flt: Filter) -> Any:
        query = query.where(ApiKeyRow.account_id == account_id)
        if flt.state is not None:
            query = query.where(ApiKeyRow.state == flt.state.value)
        if flt.project_id is not None:
            query = query.where(ApiKeyRow.project_id == flt.project_id)
        return query  # labels: list_keys checks them on the rows it walks

    @staticmethod
    def _add_event(
        session: Session,
        key: ApiKey,
        kind: EventKind,
        now: datetime,
        actor: Actor,
        changed_fields: tuple[str, ...],
        details: dict[str, Any],
    ) -> None:
        row = KeyEventRow(
            key_id=key.key_id,
            account_id=key.account_id,
            project_id=key.project_id,
            kind=kind.value,
            time=now,
            changed_fields=list(changed_fields),
            details=details,
            **_actor_columns(actor),
        )
        session.add(row)
        if session.get_bind().dialect.name == "postgresql":
            # Wakes every process's change feed (authorizer/feed.py); delivered only if this commits.
            session.flush()
            session.execute(text("SELECT pg_notify(:channel, :id)"), {"channel": FEED_CHANNEL, "id": str(row.id)})

    @staticmethod
    def _replayed(session: Session, request: IdempotentRequest, account_id: str, now: datetime) -> ApiKey | None:
        """The key an earlier request with this request_id produced, if it is still within its lifetime."""
        seen = session.get(RequestIdRow, request.request_id)
        if seen is None:
            return None
        if seen.create_time < now - REQUEST_ID_LIFETIME:
            session.delete(seen)
            session.flush()
            return None
        if (seen.account_id, seen.method, seen.fingerprint) != (account_id, request.method, request.fingerprint):
            raise request_id_reused()
        row = session.get(ApiKeyRow, seen.key_id)
        if row is None:
            raise FailedPrecondition("the key this request_id made has since been deleted")
        return _to_domain(row)

    @staticmethod
    def _remember(session: Session, request: IdempotentRequest, account_id: str, key_id: str, now: datetime) -> None:
        session.add(
            RequestIdRow(
                request_id=request.request_id,
                account_id=account_id,
                method=request.method,
                fingerprint=request.fingerprint,
                key_id=key_id,
                create_time=now,
            )
        )

    @staticmethod
    def _lock_account(session: Session, account_id: str) -> None:
        """Creates in one account queue here, so a count of its keys cannot be raced past the limit; SQLite's
        BEGIN IMMEDIATE already serializes every writer."""
        if session.get_bind().dialect.name == "postgresql":
            session.execute(text("SELECT pg_advisory_xact_lock(hashtext(:account))"), {"account": account_id})

    @staticmethod
    def _check_live_keys(session: Session, account_id: str, limit: int) -> None:
        # The live states by name, not `!= REVOKED`: two ranges of the (account, state) index, so the count
        # reads at most the live keys (at most `limit`), never the revoked ones an account piles up for audit.
        live = session.execute(
            select(func.count())
            .select_from(ApiKeyRow)
            .where(
                ApiKeyRow.account_id == account_id,
                ApiKeyRow.state.in_([state.value for state in KeyState if state is not KeyState.REVOKED]),
            )
        ).scalar_one()
        if live >= limit:
            raise ResourceExhausted(
                f"accounts/{account_id} has {live} live keys, the most allowed (APIKEYD_MAX_KEYS_PER_ACCOUNT={limit}); "
                "revoke or delete keys first"
            )
