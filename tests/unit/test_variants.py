"""The canary split: exact within sampling error on 100k users, stable across calls and processes."""

import hashlib
import math
import os
import subprocess
import sys

import pytest

from serving import variants
from serving.variants import CANARY, PRODUCTION, TrafficSplit

USERS = [f"user-{n}" for n in range(100_000)]
# Mixed id shapes, as real products send them.
ODD_USERS = ["42", "tenant/7", "ünïcødé", "a" * 256, "\udcff-surrogate", " spaced "]


def canary_share(split: TrafficSplit, users: list[str]) -> float:
    return sum(split.variant(user) == CANARY for user in users) / len(users)


@pytest.mark.parametrize(("traffic", "salt"), [(0.05, "exp-1"), (0.01, "exp-2"), (0.5, "other salt"), (0.2, "s")])
def test_split_is_exact_within_sampling_error_on_100k_users(traffic: float, salt: str) -> None:
    share = canary_share(TrafficSplit(salt, traffic), USERS)
    standard_error = math.sqrt(traffic * (1 - traffic) / len(USERS))
    deviation = (share - traffic) / standard_error
    print(f"traffic {traffic}: canary share {share:.5f} of {len(USERS):,} users ({deviation:+.2f} SE)")
    assert abs(share - traffic) < 4 * standard_error


def test_buckets_are_uniform() -> None:
    # Chi-square over 20 equal bins: a biased hash fails this even where the 5% share happens to look right.
    split = TrafficSplit("uniformity", 0.5)
    bins = [0] * 20
    for user in USERS:
        bins[split.bucket(user) * 20 >> 64] += 1
    expected = len(USERS) / 20
    chi_square = sum((count - expected) ** 2 / expected for count in bins)
    assert chi_square < 43.8  # p = 0.001 with 19 degrees of freedom


def test_a_user_keeps_their_arm_across_calls_and_new_split_objects() -> None:
    first = [TrafficSplit("exp-1", 0.05).variant(user) for user in USERS[:5000] + ODD_USERS]
    second = [TrafficSplit("exp-1", 0.05).variant(user) for user in USERS[:5000] + ODD_USERS]
    assert first == second
    split = TrafficSplit("exp-1", 0.05)
    assert all(split.variant(user) == split.variant(user) for user in ODD_USERS)


def test_a_user_keeps_their_arm_in_another_process() -> None:
    code = (
        "from serving.variants import TrafficSplit\n"
        "split = TrafficSplit('exp-1', 0.05)\n"
        "print(''.join('c' if split.variant(f'user-{n}') == 'canary' else 'p' for n in range(20000)))\n"
    )
    # A different hash seed: nothing may depend on Python's per-process str hashing.
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    other = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    split = TrafficSplit("exp-1", 0.05)
    here = "".join("c" if split.variant(f"user-{n}") == CANARY else "p" for n in range(20000))
    assert other.stdout.strip() == here
    assert "c" in here and "p" in here


def test_ramping_up_keeps_every_canary_user_in_the_canary() -> None:
    small, large = TrafficSplit("ramp", 0.05), TrafficSplit("ramp", 0.20)
    in_small = {user for user in USERS if small.variant(user) == CANARY}
    in_large = {user for user in USERS if large.variant(user) == CANARY}
    assert in_small < in_large


def test_another_salt_draws_an_independent_slice() -> None:
    first, second = TrafficSplit("first", 0.1), TrafficSplit("second", 0.1)
    both = sum(first.variant(u) == CANARY and second.variant(u) == CANARY for u in USERS)
    expected = len(USERS) * 0.1 * 0.1
    assert abs(both - expected) < 4 * math.sqrt(expected)


@pytest.mark.parametrize("traffic", [0.0, 1.0, -0.1, 1.5, math.nan])
def test_traffic_must_be_strictly_between_zero_and_one(traffic: float) -> None:
    with pytest.raises(ValueError, match="between 0 and 1"):
        TrafficSplit("salt", traffic)


def test_production_is_the_other_arm() -> None:
    split = TrafficSplit("exp", 0.3)
    assert {split.variant(user) for user in USERS[:1000]} == {CANARY, PRODUCTION}


def test_buckets_are_pinned_so_a_code_change_cannot_reshuffle_every_user() -> None:
    # Values of blake2b(salt || 0x00 || user id, digest_size=8), big-endian, taken when the split
    # shipped: a running canary's users must keep their arm across upgrades of the service.
    split = TrafficSplit("spring-2026", 0.05)
    assert split.bucket("u1") == 11728355180845096327
    assert split.bucket("user-42") == 11038651647345562910
    assert split.bucket("émilie") == 5035107461835431592
    assert TrafficSplit("spring-2026", 0.28).variant("émilie") == CANARY
    assert TrafficSplit("spring-2026", 0.27).variant("émilie") == PRODUCTION


def test_the_bucket_is_the_hash_the_module_documents() -> None:
    # BLAKE2b takes its digest size as a parameter of the hash: an 8-byte digest is not the first 8 bytes
    # of the default 64-byte one. Whoever reimplements the split (in SQL, in another service) from the
    # docstring must get the same arms.
    assert variants.__doc__ is not None and "digest_size=8" in variants.__doc__
    split = TrafficSplit("spring-2026", 0.05)
    for user in ["u1", "user-42", "émilie", "tenant/7"]:
        hashed = b"spring-2026\x00" + user.encode()
        assert split.bucket(user) == int.from_bytes(hashlib.blake2b(hashed, digest_size=8).digest(), "big")
        assert split.bucket(user) != int.from_bytes(hashlib.blake2b(hashed).digest()[:8], "big")
