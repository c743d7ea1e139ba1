"""Who may do what. A calling key acts within its own account, and a project key within its own project;
keys of the operator account act on every account. Rights are scopes: `apikeys:read`, `apikeys:write`,
`apikeys:authorize`. A caller can hand out only scopes it holds itself."""

from dataclasses import dataclass

from apikeyd.domain.errors import FailedPrecondition, PermissionDenied
from apikeyd.domain.model import ApiKey
from apikeyd.domain.scopes import ScopeSet

READ = ("apikeys", "read")
WRITE = ("apikeys", "write")
AUTHORIZE = ("apikeys", "authorize")


@dataclass(frozen=True)
class Actor:
    """Who made a change, as the audit log records it."""

    key_id: str = ""
    name: str = ""
    display_name: str = ""
    peer: str = ""
    method: str = ""


@dataclass(frozen=True)
class Caller:
    """An authenticated management caller; `key` is None for `apikeyd admin-key`, which acts as the operator."""

    key: ApiKey | None
    scopes: ScopeSet | None
    operator: bool
    peer: str = ""
    method: str = ""

    @property
    def actor(self) -> Actor:
        if self.key is None:
            return Actor(peer=self.peer, method=self.method)
        return Actor(self.key.key_id, self.key.name, self.key.display_name, self.peer, self.method)

    @property
    def account_id(self) -> str:
        return self.key.account_id if self.key is not None else ""

    @property
    def project_id(self) -> str:
        """The project the caller is confined to; empty for an account-wide or operator key."""
        return "" if self.operator or self.key is None else self.key.project_id

    def require(self, right: tuple[str, str]) -> None:
        if self.scopes is not None and not self.scopes.grants(right, ""):
            raise PermissionDenied(f"the calling key lacks the scope {right[0]}:{right[1]}")

    def check_account(self, account_id: str) -> None:
        """Raised before any read, so the answer is the same whether or not the target exists."""
        if not self.operator and account_id != self.account_id:
            raise PermissionDenied(f"the calling key cannot act on accounts/{account_id}")

    def reaches(self, key: ApiKey) -> bool:
        """Whether the key is within the caller's account and project; outside, it is as if missing."""
        if self.operator:
            return True
        return key.account_id == self.account_id and (not self.project_id or key.project_id == self.project_id)

    def project_for_new_key(self, requested: str) -> str:
        """A project key creates keys in its own project only; it names it, or leaves it to be filled in."""
        if not self.project_id:
            return requested
        if requested and requested != self.project_id:
            raise PermissionDenied(
                f"a project key creates keys in its own project {self.project_id!r} only, not in {requested!r}"
            )
        return self.project_id

    def check_grant(self, scopes: tuple[str, ...]) -> None:
        if self.scopes is None:
            return
        for scope in scopes:
            if not self.scopes.covers(scope):
                raise PermissionDenied(f"the calling key cannot grant the scope {scope!r}, which it does not hold")

    def check_manage(self, key: ApiKey) -> None:
        """Changing or rotating a key needs every scope it has: rotating hands out its new secret."""
        if self.scopes is None:
            return
        for scope in key.scopes:
            if not self.scopes.covers(scope):
                raise PermissionDenied(
                    f"the key holds the scope {scope!r}, which the calling key does not; "
                    "it can be revoked or deleted but not changed or rotated by this caller"
                )

    def check_self(self, key: ApiKey, allow_self: bool, action: str) -> None:
        if self.key is not None and key.key_id == self.key.key_id and not allow_self:
            raise FailedPrecondition(
                f"this is the key the call is made with; to {action} it, send the request again with allow_self: true"
            )
