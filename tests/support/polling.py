"""Waiting for something another thread or process does: a condition polled until a deadline."""

import time
from collections.abc import Callable


def wait_until(condition: Callable[[], bool], within: float = 5.0, interval: float = 0.01) -> float:
    """The seconds it took ``condition`` to hold, polled every ``interval``; an AssertionError after ``within``."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > within:
            raise AssertionError(f"not true within {within} s")
        time.sleep(interval)
    return time.monotonic() - start
