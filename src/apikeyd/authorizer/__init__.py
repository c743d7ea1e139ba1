"""The Authorize decision: the cache of verified keys, argon2 verification, rate limits, last-used times."""
