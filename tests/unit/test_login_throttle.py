"""The console's sign-in throttle: five failures a window per client, an IPv6 client counted as its /64;
and who the client is behind trusted proxies."""

from fastapi import Request

from console.app import create_app
from console.auth import LoginThrottle, client_address, over_https
from console.settings import get_console_settings


def test_five_failures_refuse_the_client_until_the_oldest_is_out_of_the_window() -> None:
    throttle = LoginThrottle(attempts=5, window=900)
    for second in range(5):
        assert throttle.retry_after("198.51.100.7", now=second) == 0
        throttle.failed("198.51.100.7", now=second)
    assert throttle.retry_after("198.51.100.7", now=10) == 890
    assert throttle.retry_after("198.51.100.8", now=10) == 0  # another IPv4 address is another client
    assert throttle.retry_after("198.51.100.7", now=901) == 0


def test_fresh_ipv6_addresses_of_one_network_are_one_client() -> None:
    throttle = LoginThrottle(attempts=5, window=900)
    for n in range(5):
        throttle.failed(f"2001:db8:1:2::{n + 1:x}", now=n)
    assert throttle.retry_after("2001:db8:1:2:ffff::9", now=10) > 0
    assert throttle.retry_after("2001:db8:1:3::1", now=10) == 0  # the next /64 is someone else
    throttle.succeeded("2001:db8:1:2::99")
    assert throttle.retry_after("2001:db8:1:2::1", now=10) == 0
    assert throttle.retry_after("::ffff:198.51.100.7", now=10) == 0  # IPv4-mapped: counted as given


FIRST_PROXY, SECOND_PROXY = "10.0.0.1", "10.0.0.2"


def request_from(peer: str, header: bytes, lines: str | list[str] | None) -> Request:
    """A request from `peer` to a console that trusts the two proxies, with one line of `header` for each
    of `lines` (one for a string, none for None)."""
    settings = get_console_settings(
        database_url="postgresql://db/overnight", api_keys=("key",), trusted_proxies=f"{FIRST_PROXY},{SECOND_PROXY}"
    )
    values = [] if lines is None else [lines] if isinstance(lines, str) else lines
    headers = [(header, value.encode()) for value in values]
    scope = {"type": "http", "app": create_app(settings), "client": (peer, 50000), "headers": headers, "path": "/"}
    return Request(scope)


def client_of(peer: str, forwarded_for: str | list[str] | None) -> str:
    """`client_address` of a request from `peer` to a console that trusts the two proxies."""
    return client_address(request_from(peer, b"x-forwarded-for", forwarded_for))


def test_behind_a_chain_of_trusted_proxies_the_client_is_the_nearest_untrusted_hop() -> None:
    # The client sent a made-up hop; the first proxy appended the client, the second the first proxy.
    assert client_of(SECOND_PROXY, f"203.0.113.66, 198.51.100.7, {FIRST_PROXY}") == "198.51.100.7"
    assert client_of(FIRST_PROXY, "198.51.100.7") == "198.51.100.7"
    assert client_of(SECOND_PROXY, FIRST_PROXY) == FIRST_PROXY  # the request started at a proxy
    assert client_of(SECOND_PROXY, None) == SECOND_PROXY
    # Anyone else's X-Forwarded-For is whatever they chose to send.
    assert client_of("192.0.2.9", "198.51.100.7") == "192.0.2.9"


def test_every_x_forwarded_for_line_counts_in_order() -> None:
    """A proxy such as HAProxy adds its own header line rather than append to the client's: the lines are
    one list (RFC 7230), so a made-up first line is as far from us as a made-up first hop."""
    assert client_of(FIRST_PROXY, ["7.7.7.1", "3.3.3.3"]) == "3.3.3.3"
    assert client_of(SECOND_PROXY, ["203.0.113.66, 7.7.7.1", "198.51.100.7", FIRST_PROXY]) == "198.51.100.7"
    assert client_of(SECOND_PROXY, ["7.7.7.1", f"198.51.100.7, {FIRST_PROXY}"]) == "198.51.100.7"


def test_a_hop_is_its_address_without_a_port_or_brackets() -> None:
    """A proxy that writes `ip:port` must not make each of a client's connections a new client."""
    assert client_of(FIRST_PROXY, "203.0.113.7:1234") == "203.0.113.7"
    assert client_of(FIRST_PROXY, "[2001:db8::1]:443") == "2001:db8::1"
    assert client_of(FIRST_PROXY, "[2001:db8::1]") == "2001:db8::1"
    assert client_of(FIRST_PROXY, "2001:db8::1") == "2001:db8::1"  # a bare IPv6 address's colons are no port
    # a trusted proxy written with a port is still the proxy, and the hop before it the client
    assert client_of(SECOND_PROXY, f"198.51.100.7:5555, {FIRST_PROXY}:8080") == "198.51.100.7"
    assert client_of(SECOND_PROXY, f"[{FIRST_PROXY}]:8080") == FIRST_PROXY
    # one client however its connections' ports change: its failures add up
    throttle = LoginThrottle(attempts=5, window=900)
    for port in range(40000, 40005):
        throttle.failed(client_of(FIRST_PROXY, f"203.0.113.7:{port}"), now=0)
    assert throttle.retry_after(client_of(FIRST_PROXY, "203.0.113.7:40099"), now=1) > 0


def test_the_scheme_is_the_nearest_proxys_whichever_line_it_wrote() -> None:
    def https(peer: str, lines: list[str]) -> bool:
        return over_https(request_from(peer, b"x-forwarded-proto", lines))

    assert https(FIRST_PROXY, ["http", "https"])  # the client wrote the first line, the proxy the last
    assert not https(FIRST_PROXY, ["https", "http"])
    assert not https("192.0.2.9", ["http", "https"])  # not from a trusted proxy: never believed
