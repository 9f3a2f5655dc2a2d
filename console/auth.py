"""Who may open the dashboard: signed session cookies (a browser cannot send a bearer header when it navigates),
bearer keys for scripts, compared in constant time, a sign-in throttle, and which proxies are believed about the
client's address and scheme (docs/monitoring.md#the-dashboard).
"""

import hashlib
import hmac
import logging
import math
import re
import time
from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence
from ipaddress import IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network

from fastapi import Request, Response

from common.web import key_digest
from console.settings import ConsoleSettings

logger = logging.getLogger(__name__)

COOKIE = "overnight_dashboard"
COOKIE_PATH = "/dashboard"
SESSION_SECONDS = 12 * 3600


def settings_of(request: Request) -> ConsoleSettings:
    settings: ConsoleSettings = request.app.state.settings
    return settings


def _signature(key: str, expires: int) -> str:
    return hmac.new(key_digest(key), f"overnight-dashboard|{expires}".encode(), hashlib.sha256).hexdigest()


def session_token(key: str, now: float | None = None) -> str:
    """``<expiry>.<HMAC of the expiry under the key>``: every worker can check it, and removing the
    key from the configuration ends the sessions opened with it."""
    expires = int((now or time.time()) + SESSION_SECONDS)
    return f"{expires}.{_signature(key, expires)}"


# What `session_token` makes, and nothing else: any other cookie is no session (never an error).
_SESSION_TOKEN = re.compile(r"([0-9]{1,12})\.([0-9a-f]{64})", re.ASCII)


def valid_session(settings: ConsoleSettings, token: str | None) -> bool:
    found = _SESSION_TOKEN.fullmatch(token) if token else None
    if found is None:
        return False
    expires = int(found[1])
    if expires < time.time():
        return False
    matched = False
    for key in settings.keys:
        matched |= hmac.compare_digest(found[2], _signature(key, expires))
    return matched


def matching_key(settings: ConsoleSettings, presented: str) -> str | None:
    """The configured key `presented` is, compared with every key in constant time; None if none."""
    digest = key_digest(presented)
    found = None
    for key in settings.keys:
        if hmac.compare_digest(digest, key_digest(key)):
            found = key
    return found


def authorised(request: Request) -> bool:
    """A valid session cookie or bearer key, or auth turned off with ``--no-auth``. A bearer key counts
    as a sign-in: a wrong one is a failure for the throttle, and a throttled client's key is not tried."""
    if request.app.state.auth_disabled:
        return True
    settings = settings_of(request)
    if valid_session(settings, request.cookies.get(COOKIE)):
        return True
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not credentials.strip():
        return False
    client = client_address(request)
    throttle = throttle_of(request)
    if throttle.retry_after(client):
        return False
    if matching_key(settings, credentials.strip()) is None:
        throttle.failed(client)
        return False
    throttle.succeeded(client)
    return True


def with_session(response: Response, request: Request, key: str) -> Response:
    response.set_cookie(
        COOKIE,
        session_token(key),
        max_age=SESSION_SECONDS,
        path=COOKIE_PATH,
        httponly=True,
        samesite="strict",
        secure=over_https(request),
    )
    return response


def without_session(response: Response) -> Response:
    response.delete_cookie(COOKIE, path=COOKIE_PATH)
    return response


def _proxied(request: Request) -> bool:
    """Whether the request came from a proxy we trust to say who the client is and how it connected."""
    peer = request.client.host if request.client else None
    return peer is not None and _trusted(peer, settings_of(request).trusted_proxies)


def _trusted(host: str, proxies: Iterable[IPv4Network | IPv6Network]) -> bool:
    try:
        address = ip_address(host)
    except ValueError:
        return False
    return any(address in network for network in proxies)


def _list_header(request: Request, name: str) -> str:
    """All of a list header's lines joined in order, as one line (RFC 7230 section 3.2.2): a proxy may add
    its own line rather than append to the client's, and `headers.get` reads the first line only, which
    is the one the client wrote."""
    return ",".join(request.headers.getlist(name))


def over_https(request: Request) -> bool:
    if request.url.scheme == "https":
        return True
    forwarded = _list_header(request, "x-forwarded-proto")
    # The proxy nearest to us appends last: its word is the one we trust.
    return bool(forwarded) and forwarded.split(",")[-1].strip().lower() == "https" and _proxied(request)


def client_address(request: Request) -> str:
    """The client as the trusted proxies saw it (`forwarded_client`), else the peer."""
    peer = request.client.host if request.client else "unknown"
    forwarded_for = _list_header(request, "x-forwarded-for")
    return forwarded_client(peer, forwarded_for, settings_of(request).trusted_proxies)


def forwarded_client(peer: str, forwarded_for: str, proxies: Sequence[IPv4Network | IPv6Network]) -> str:
    """The client of a request from `peer`: when the peer is one of the trusted `proxies`, the nearest
    X-Forwarded-For hop that is not a trusted proxy itself (each proxy appends the address it was reached
    from, so the hops left of that one are whatever the client chose to send); else the peer. A hop is its
    address without a port or IPv6 brackets (`_hop_address`): the client's port changes with each connection."""
    if not _trusted(peer, proxies):
        return peer
    hops = [_hop_address(hop)[:64] for hop in forwarded_for.split(",") if hop.strip()]
    for hop in reversed(hops):
        if not _trusted(hop, proxies):
            return hop
    # Every hop a trusted proxy: the request started at one of them.
    return hops[0] if hops else peer


def _hop_address(hop: str) -> str:
    """An X-Forwarded-For hop's address: `203.0.113.7:1234` is 203.0.113.7, `[2001:db8::1]:443` and
    `[2001:db8::1]` are 2001:db8::1; a bare IPv6 address (its colons are no port) or anything else as given."""
    hop = hop.strip()
    if hop.startswith("["):
        inside, bracket, _ = hop[1:].partition("]")
        return inside.strip() if bracket else hop
    host, colon, port = hop.rpartition(":")
    if colon and host and ":" not in host and port.isascii() and port.isdigit():
        return host
    return hop


class LoginThrottle:
    """Slows down key guessing: after `attempts` failed sign-ins from one client within `window` seconds,
    that client's next sign-ins are refused (429, with Retry-After) until the oldest failure is older
    than the window. A successful sign-in clears the client's failures. Each worker counts its own
    failures (with N workers a client gets up to N x `attempts` tries a window), at most `clients`
    clients (the longest quiet are forgotten first). An IPv6 client counts as its /64 network, which one
    host commonly holds whole: a fresh address for each try would otherwise be a fresh client."""

    def __init__(self, attempts: int = 5, window: float = 900.0, clients: int = 10_000) -> None:
        self.attempts = attempts
        self.window = window
        self.clients = clients
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def retry_after(self, client: str, now: float | None = None) -> int:
        """Seconds until `client` may try again; 0 when it may now."""
        failures = self._failures.get(_counted_as(client))
        if failures is None:
            return 0
        now = time.monotonic() if now is None else now
        while failures and failures[0] <= now - self.window:
            failures.popleft()
        if len(failures) < self.attempts:
            return 0
        return max(1, math.ceil(failures[0] + self.window - now))

    def failed(self, client: str, now: float | None = None) -> None:
        client = _counted_as(client)
        failures = self._failures.pop(client, None) or deque(maxlen=self.attempts)
        failures.append(time.monotonic() if now is None else now)
        self._failures[client] = failures
        while len(self._failures) > self.clients:
            self._failures.popitem(last=False)

    def succeeded(self, client: str) -> None:
        self._failures.pop(_counted_as(client), None)


def _counted_as(client: str) -> str:
    """The key a client's failures count under: an IPv6 address's /64 network, else the client as given."""
    try:
        address = ip_address(client)
    except ValueError:
        return client
    if isinstance(address, IPv6Address) and address.ipv4_mapped is None:
        return str(ip_network(f"{client}/64", strict=False))
    return client


def throttle_of(request: Request) -> LoginThrottle:
    throttle: LoginThrottle = request.app.state.login_throttle
    return throttle
