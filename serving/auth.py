"""Bearer API keys: a request must carry one of the configured keys (compared in constant time)."""

import hmac
from collections.abc import Iterable

from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from common.web import key_digest
from serving.errors import NotAuthenticatedError

# auto_error=False: a missing or malformed header is ours to answer (401 with WWW-Authenticate).
bearer_scheme = HTTPBearer(auto_error=False, description="One of the keys in OVERNIGHT_API_KEYS.")


class ApiKeys:
    def __init__(self, keys: Iterable[str]) -> None:
        # Digests have one length, so the comparison time says nothing about a key's length either.
        self._digests = tuple(key_digest(key) for key in keys)

    def check(self, credentials: HTTPAuthorizationCredentials | None) -> None:
        self.check_token(None if credentials is None else credentials.credentials)

    def check_token(self, token: str | None) -> None:
        if not token:
            raise NotAuthenticatedError("missing bearer token: send Authorization: Bearer <key>")
        presented = key_digest(token)
        matched = False
        for digest in self._digests:
            # No early exit: every configured key is compared on every request.
            matched |= hmac.compare_digest(presented, digest)
        if not matched:
            raise NotAuthenticatedError("invalid API key")


def bearer_token(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header among raw ASGI headers, as HTTPBearer reads it."""
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token if scheme.lower() == "bearer" and token else None
    return None
