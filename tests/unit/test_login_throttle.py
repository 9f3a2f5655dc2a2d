"""The console's sign-in throttle: five failures a window per client, an IPv6 client counted as its /64."""

from console.auth import LoginThrottle


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
