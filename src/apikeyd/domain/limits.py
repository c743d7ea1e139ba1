"""How much a caller may send: every input limit in one place, with the reason for its value.

Each limit is checked before the request does any work (no key digest, no scope parse, no database), so
that the work and the memory a request can take are bounded by these numbers whatever it carries, and an
over-limit request gets INVALID_ARGUMENT naming the field and the limit. Rules about a field's *shape*
stay with the field (domain/model.py, domain/scopes.py); their own bounds are listed at the end so that
this module reads as the complete table (README "Input limits" has the same table).

grpc checks two sizes before any of this runs, and answers RESOURCE_EXHAUSTED itself: the message size
(APIKEYD_MAX_REQUEST_BYTES, set in server.py) and metadata above GRPC_METADATA_BYTES.
"""

from collections.abc import Collection, Iterable

from apikeyd.domain.errors import InvalidArgument
from apikeyd.domain.ip_ranges import MAX_IP_LENGTH as MAX_IP_LENGTH
from apikeyd.domain.ip_ranges import MAX_IP_RANGES as MAX_IP_RANGES
from apikeyd.domain.model import MAX_LABEL_VALUE as MAX_LABEL_VALUE
from apikeyd.domain.model import MAX_LABELS as MAX_LABELS
from apikeyd.domain.model import MAX_RATE_LIMITS as MAX_RATE_LIMITS

# --- whole requests -------------------------------------------------------------------------------

# The largest valid request is a CreateApiKey with 100 scopes of 320 characters, most of them four-byte
# UTF-8 in `{value}` qualifiers, 64 labels and the longest names and description: 122 KB. An Envoy
# CheckRequest carries the client's headers, which Envoy caps at 60 KiB by default. 128 KiB holds both and
# is 32 times below grpc's default of 4 MiB. A setting (APIKEYD_MAX_REQUEST_BYTES): operators whose keys
# are plain ASCII may go lower, down to MIN_MAX_REQUEST_BYTES, and an Envoy allowing larger headers needs more.
DEFAULT_MAX_REQUEST_BYTES = 128 * 1024
MIN_MAX_REQUEST_BYTES = 16 * 1024
# Calls served at once by one process (APIKEYD_MAX_CONCURRENT_RPCS, default 1000): an open health Watch
# holds its grpc call state for as long as its client likes, so without a bound anyone could hold any
# number. A sidecar Envoy keeps a few dozen checks in flight; below this floor one busy proxy would be refused.
MIN_CONCURRENT_RPCS = 100
# Metadata: ours is what grpc clients already live with (grpc's own default soft limit); grpc's limit is
# set twice as high, so that metadata between the two gets INVALID_ARGUMENT from us, not grpc's
# RESOURCE_EXHAUSTED (which only metadata beyond GRPC_METADATA_BYTES still gets).
MAX_METADATA_BYTES = 8 * 1024
GRPC_METADATA_BYTES = 2 * MAX_METADATA_BYTES

# --- credentials and ids --------------------------------------------------------------------------

# The longest key string is 80 characters (a 24-character prefix, lookup id, secret, checksum); anything
# past this cannot be a key of any format this service may adopt, and is refused before it is digested.
MAX_KEY_LENGTH = 256
MAX_AUTHORIZATION_LENGTH = len("Bearer ") + MAX_KEY_LENGTH
# apikeyd.logs takes an x-request-id of up to 128 plain characters into its log lines.
MAX_X_REQUEST_ID_LENGTH = 128
MAX_REQUEST_ID_LENGTH = 36  # request_id is a UUID
# An account or project id is 1-63 characters (model.ID_RULE); a key id a 36-character UUID.
MAX_ID_LENGTH = 63
MAX_PARENT_LENGTH = len("accounts/") + MAX_ID_LENGTH
MAX_NAME_LENGTH = MAX_PARENT_LENGTH + len("/apiKeys/") + 36
MAX_ETAG_LENGTH = 32  # an etag is `r<revision>`
# Page tokens are a few dozen bytes of position and a fingerprint; 1 KiB leaves room for any token format.
MAX_PAGE_TOKEN_LENGTH = 1024

# --- Authorize and Envoy's Check ------------------------------------------------------------------

# A route or caller needs a handful of scopes; 64 is generous and keeps a check's scope work to microseconds.
MAX_REQUIRED_SCOPES = 64
MAX_REQUIRED_SCOPE_LENGTH = 256
# A `{value}` qualifier holds at most 255 characters, so a longer resource only ever matches `all`: 512
# leaves room for such resources (long domains, paths) without letting one weigh on every check.
MAX_RESOURCE_LENGTH = 512
MAX_PROJECT_ID_LENGTH = MAX_ID_LENGTH
# A route's context_extensions: four keys are known (ext_authz.py); the rest bound the work of refusing
# a misconfigured route, whose map is the same on every request. required_scopes holds up to 64 scopes.
MAX_CONTEXT_EXTENSIONS = 16
MAX_CONTEXT_EXTENSION_KEY_LENGTH = 64
MAX_CONTEXT_EXTENSION_VALUE_LENGTH = 1024  # a list of 64 short scopes
# The client's headers in a Check: Envoy forwards at most its max_headers_count (100 by default); ten times
# that leaves room for a raised setting, and many more come only from a caller that is not a proxy.
MAX_REQUEST_HEADERS = 1000

# --- health ---------------------------------------------------------------------------------------

# The services health answers for are "" and apikeyd.v1.ApiKeyService; 256 leaves room for any full name.
MAX_HEALTH_SERVICE_LENGTH = 256

# --- listing --------------------------------------------------------------------------------------

# A filter names each field once, and the fields are few (state, project_id, labels.*; key_id, kind,
# actor_key_id, event_time), so a real filter has a handful of terms. 20 terms of at most 256 characters
# keep the statement far below SQLite's expression-depth limit (1000) and each page's row-by-row checks
# (listing.max_rows_examined) to 20 per row; 2048 characters hold them.
MAX_FILTER_LENGTH = 2048
MAX_FILTER_TERMS = 20
MAX_FILTER_VALUE_LENGTH = 256

# --- ListApiKeyUsage ------------------------------------------------------------------------------

# A dashboard's page of keys in one call; 1000 ids keep the statement's IN list far below both databases'
# parameter limits and the request far below APIKEYD_MAX_REQUEST_BYTES (38 KB). A key id is a UUID.
MAX_USAGE_KEY_IDS = 1000
MAX_KEY_ID_LENGTH = 36

# --- UpdateApiKey ---------------------------------------------------------------------------------

MAX_UPDATE_MASK_PATHS = 16  # nine fields are updatable, and two parts of credits (domain/updates.py)
MAX_UPDATE_MASK_PATH_LENGTH = 64

# --- bounds of the field rules elsewhere, for the complete table -----------------------------------
# model.py: display_name 1-255 characters, description and revoke reason at most 1024, labels (MAX_LABELS,
# keys and values of MAX_LABEL_VALUE) and rate limits (MAX_RATE_LIMITS), imported above; ip_ranges.py: at
# most MAX_IP_RANGES ranges of MAX_IP_LENGTH characters, and a client_ip of as many; credits.py: balances and
# refills up to 10^15, a cost up to 10^9. A key's scopes:
MAX_SCOPES = 100
MAX_SCOPE_LENGTH = 320


def check_length(field: str, value: str | bytes, limit: int, unit: str = "characters") -> None:
    if len(value) > limit:
        raise InvalidArgument(field, f"at most {limit} {unit}, got {len(value)}")


def check_count(field: str, values: Collection[object], limit: int) -> None:
    if len(values) > limit:
        raise InvalidArgument(field, f"at most {limit} entries, got {len(values)}")


def check_each_length(field: str, values: Iterable[str], limit: int) -> None:
    for index, value in enumerate(values):
        if len(value) > limit:
            raise InvalidArgument(field, f"each entry at most {limit} characters, entry {index} has {len(value)}")


def check_authorize(key: str, required_scopes: Collection[str], resource: str, project_id: str) -> None:
    """An Authorize request's bounds, on the server and in the client library alike."""
    check_length("key", key, MAX_KEY_LENGTH)
    check_count("required_scopes", required_scopes, MAX_REQUIRED_SCOPES)
    check_each_length("required_scopes", required_scopes, MAX_REQUIRED_SCOPE_LENGTH)
    check_length("resource", resource, MAX_RESOURCE_LENGTH)
    check_length("project_id", project_id, MAX_PROJECT_ID_LENGTH)
