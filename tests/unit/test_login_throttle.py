"""The console's sign-in throttle: five failures a window per client, an IPv6 client counted as its /64;
and who the client is behind trusted proxies."""

from fastapi import Request

from console.app import create_app
from console.auth import LoginThrottle, client_address
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


def client_of(peer: str, forwarded_for: str | None) -> str:
    """`client_address` of a request from `peer` to a console that trusts the two proxies."""
    settings = get_console_settings(
        database_url="postgresql://db/overnight", api_keys=("key",), trusted_proxies=f"{FIRST_PROXY},{SECOND_PROXY}"
    )
    headers = [] if forwarded_for is None else [(b"x-forwarded-for", forwarded_for.encode())]
    scope = {"type": "http", "app": create_app(settings), "client": (peer, 50000), "headers": headers}
    return client_address(Request(scope))


def test_behind_a_chain_of_trusted_proxies_the_client_is_the_nearest_untrusted_hop() -> None:
    # The client sent a made-up hop; the first proxy appended the client, the second the first proxy.
    assert client_of(SECOND_PROXY, f"203.0.113.66, 198.51.100.7, {FIRST_PROXY}") == "198.51.100.7"
    assert client_of(FIRST_PROXY, "198.51.100.7") == "198.51.100.7"
    assert client_of(SECOND_PROXY, FIRST_PROXY) == FIRST_PROXY  # the request started at a proxy
    assert client_of(SECOND_PROXY, None) == SECOND_PROXY
    # Anyone else's X-Forwarded-For is whatever they chose to send.
    assert client_of("192.0.2.9", "198.51.100.7") == "192.0.2.9"
