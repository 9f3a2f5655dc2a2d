"""The canary split: a user's bucket is ``blake2b(salt || 0x00 || user_id, digest_size=8)`` (a parameter of the hash,
not the first 8 bytes of the default digest), salt and user id UTF-8 encoded, read big-endian as an integer in
[0, 2**64); the user is in the canary when it is below ``traffic * 2**64``, the same in every request, process and
day, so ramping up keeps every user already in the canary."""

import hashlib

from sql.contract import CANARY_VARIANT as CANARY
from sql.contract import PRODUCTION_VARIANT as PRODUCTION
from sql.contract import Variant

__all__ = ["CANARY", "PRODUCTION", "TrafficSplit", "Variant"]

_BUCKETS = 1 << 64


class TrafficSplit:
    """Routes a `traffic` share of users (0 < traffic < 1) to the canary; about a microsecond a call."""

    __slots__ = ("_prefix", "_threshold", "salt", "traffic")

    def __init__(self, salt: str, traffic: float) -> None:
        if not 0.0 < traffic < 1.0:
            raise ValueError(f"traffic must be between 0 and 1 (exclusive), got {traffic}")
        if not salt:
            raise ValueError("salt must not be empty")
        self.salt = salt
        self.traffic = traffic
        self._prefix = hashlib.blake2b(salt.encode() + b"\x00", digest_size=8)
        self._threshold = round(traffic * _BUCKETS)

    def bucket(self, user_id: str) -> int:
        hasher = self._prefix.copy()
        # surrogatepass: any str the HTTP layer lets through hashes, instead of raising.
        hasher.update(user_id.encode("utf-8", "surrogatepass"))
        return int.from_bytes(hasher.digest(), "big")

    def variant(self, user_id: str) -> Variant:
        return CANARY if self.bucket(user_id) < self._threshold else PRODUCTION

    def __repr__(self) -> str:
        return f"TrafficSplit(salt={self.salt!r}, traffic={self.traffic})"
