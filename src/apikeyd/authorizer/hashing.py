"""argon2id hashes of secrets. The secrets are 196 random bits, so the hash cost is a second line of
defence for a stolen table rather than a guard against guessing; the defaults keep a cold check cheap."""

import threading
from dataclasses import dataclass

import argon2
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError


@dataclass(frozen=True)
class Argon2Parameters:
    time_cost: int = 1
    memory_cost_kib: int = 8192
    parallelism: int = 1


class SecretHasher:
    def __init__(self, parameters: Argon2Parameters = Argon2Parameters()) -> None:
        self._hasher = argon2.PasswordHasher(
            time_cost=parameters.time_cost,
            memory_cost=parameters.memory_cost_kib,
            parallelism=parameters.parallelism,
            type=argon2.Type.ID,
        )
        self._lock = threading.Lock()
        self.verifications = 0  # how many argon2 verifications ran: the tests and benchmarks count them

    def hash(self, secret: str) -> str:
        return self._hasher.hash(secret)

    def verify(self, secret_hash: str, secret: str) -> bool:
        """Constant-time inside libargon2; False for a mismatch or an unreadable hash."""
        with self._lock:
            self.verifications += 1
        try:
            return self._hasher.verify(secret_hash, secret)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False
