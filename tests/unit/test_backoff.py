"""Reconnect delays: the official client's numbers, as the Dart original's
ws_manager_test.dart pins them (exponential mode and seeded jitter)."""

from __future__ import annotations

import random

import pytest

from dartvex_auth_better.convex._transport import (
    CLIENT_INITIAL_BACKOFF,
    MAX_BACKOFF,
    backoff_delay,
    initial_backoff_for,
)


class FixedJitter(random.Random):
    """A random source whose jitter factor is fixed (and which records the range asked)."""

    def __init__(self, factor: float) -> None:
        super().__init__(0)
        self.factor = factor
        self.ranges: list[tuple[float, float]] = []

    def uniform(self, a: float, b: float) -> float:
        self.ranges.append((a, b))
        return self.factor


NO_JITTER = FixedJitter(1.0)


@pytest.mark.parametrize(
    ("initial", "retries", "expected"),
    [
        (CLIENT_INITIAL_BACKOFF, 0, 0.1),  # 100 ms @ 0
        (CLIENT_INITIAL_BACKOFF, 3, 0.8),  # 800 ms @ 3
        (1.0, 0, 1.0),  # 1000 ms @ 0
        (1.0, 4, 16.0),
        (1.0, 5, 16.0),  # capped
        (1.0, 100, 16.0),  # 16 s cap at index 100
        (CLIENT_INITIAL_BACKOFF, 10**6, 16.0),  # a huge index cannot overflow
    ],
)
def test_exponential_schedule_and_cap(initial: float, retries: int, expected: float):
    assert backoff_delay(initial, retries, NO_JITTER) == pytest.approx(expected)


def test_a_custom_maximum_caps_the_schedule():
    assert backoff_delay(1.0, 10, NO_JITTER, maximum=2.5) == pytest.approx(2.5)


def test_jitter_at_its_extremes_is_half_and_one_and_a_half():
    low, high = FixedJitter(0.5), FixedJitter(1.5)
    assert backoff_delay(1.0, 0, low) == pytest.approx(0.5)
    assert backoff_delay(1.0, 0, high) == pytest.approx(1.5)
    assert low.ranges == high.ranges == [(0.5, 1.5)]
    # Jitter applies after the cap: at most 1.5 x 16 s.
    assert backoff_delay(1.0, 100, high) == pytest.approx(1.5 * MAX_BACKOFF)


def test_seeded_jitter_stays_in_the_band_of_each_reason():
    rng = random.Random(7)
    unknown = [backoff_delay(initial_backoff_for("SomethingElse"), 0, rng) for _ in range(200)]
    committer = [
        backoff_delay(initial_backoff_for("CommitterFullError"), 0, rng) for _ in range(200)
    ]
    assert all(0.5 <= d <= 1.5 for d in unknown)
    assert all(1.5 <= d <= 4.5 for d in committer)
    # Really jittered, not a constant.
    assert max(unknown) - min(unknown) > 0.5 and max(committer) - min(committer) > 1.5


def test_the_same_seed_gives_the_same_delays():
    first = [backoff_delay(1.0, n, random.Random(7)) for n in range(5)]
    second = [backoff_delay(1.0, n, random.Random(7)) for n in range(5)]
    assert first == second


@pytest.mark.parametrize(
    "reason",
    [
        "SubscriptionsWorkerFullError",
        "SubscriptionsWorkerFullError: too many subscriptions",  # a prefix match
        "TooManyConcurrentRequests",
        "CommitterFullError",
        "AwsTooManyRequestsException",
        "ExecuteFullError",
        "SystemTimeoutError",
        "ExpiredInQueue",
        "VectorIndexTooLarge",
        "SearchIndexTooLarge",
        "TooManyWritesInTimePeriod",
    ],
)
def test_overload_reasons_start_at_three_seconds(reason: str):
    assert initial_backoff_for(reason) == 3.0


@pytest.mark.parametrize(
    "reason",
    [
        None,
        "",
        "InternalServerError",
        "VectorIndexesUnavailable",
        "SearchIndexesUnavailable",
        "TableSummariesUnavailable",
        "closed with code 1006",
        "xSubscriptionsWorkerFullError",  # a prefix, not a substring
    ],
)
def test_other_server_reasons_start_at_one_second(reason: str | None):
    assert initial_backoff_for(reason) == 1.0
