"""ListApiKeyUsage: how keys were used, for one key or for many keys of an account in one call. Rights as for
every read (apikeys:read, the caller's account; a refusal is audited by KeyManager), and the caller's reach:
a project key sees its project's buckets only, and a key outside its reach reads as one without usage, the
same answer whether or not it exists, since usage outlives a key's deletion. Pages are keyset pages on
(key_id, bucket) with signed page tokens (domain/listing.py)."""

from datetime import UTC, datetime

from apikeyd.domain import listing
from apikeyd.domain.access import Caller
from apikeyd.domain.model import key_name
from apikeyd.domain.usage import ALL_KEYS, Usage, UsageQuery
from apikeyd.lifecycle import KeyManager
from apikeyd.store import usage as store_usage
from apikeyd.store.repository import Repository


class UsageQueries:
    def __init__(self, manager: KeyManager, repository: Repository) -> None:
        self._manager = manager
        self._repository = repository

    async def list_usage(self, caller: Caller, query: UsageQuery, page_token: str) -> tuple[list[Usage], str]:
        account_id = query.account_id
        if query.single_key:
            await self._manager.require_read(caller, account_id, key_name(account_id, query.key_ids[0]), query.key_ids[0])
        else:
            await self._manager.require_read(caller, account_id, key_name(account_id, ALL_KEYS))
        token_key = await self._manager.page_token_key()
        bound = query.bound_to()
        if page_token:
            after, end = listing.decode_usage_page_token(token_key, page_token, account_id, bound)
        else:
            after, end = None, query.end or datetime.now(UTC)
        found, resume = await self._manager.run(
            lambda: store_usage.page(
                self._repository,
                account_id,
                caller.project_id,
                query.key_ids,
                query.granularity,
                query.start,
                end,
                query.page_size,
                after,
            ),
        )
        token = "" if resume is None else listing.encode_usage_page_token(token_key, account_id, bound, resume, end)
        return found, token
