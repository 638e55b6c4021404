"""The smoothed final loss is the authors' released definition, on series logged every 1, 5, 10.

window = min(100, 1% of the logged points), sigma = window / log interval (no floor), scipy's
gaussian_filter1d (reflect), value at the last point. The expected values below were computed
by hand-written arithmetic (`_by_hand`: an explicit truncated Gaussian kernel and reflection),
not by scipy, and are written out as literals.
"""

from __future__ import annotations

import math

import pytest

from steplaw_train.smoothing import smoothed_final_loss, smoothing_sigma


def _by_hand(y: list[float], sigma: float) -> float:
    """Last point of a Gaussian smoothing with scipy's conventions, written out: kernel radius
    int(4 sigma + 0.5), weights exp(-k^2 / 2 sigma^2) normalised, indices reflected about the
    ends (d c b a | a b c d | d c b a)."""
    r, n = int(4 * sigma + 0.5), len(y)
    ks = range(-r, r + 1)
    w = [math.exp(-0.5 * k * k / sigma**2) for k in ks]

    def reflect(i: int) -> int:
        while not 0 <= i < n:
            i = -i - 1 if i < 0 else 2 * n - 1 - i
        return i

    return sum(wk * y[reflect(n - 1 + k)] for wk, k in zip(w, ks, strict=True)) / sum(w)


# (series, log interval, sigma by the definition, expected value computed by _by_hand)
CASES = {
    # every step, 50 points: window 0.5, sigma 0.5 (below one point: no floor)
    "interval 1, short": ([float(i) for i in range(50)], 1, 0.5, 48.8927576327782),
    # every step, 20,000 points: window capped at 100, sigma 100
    "interval 1, long": ([5.0 - i * 1e-4 for i in range(20000)], 1, 100.0, 3.0080268498506753),
    # every 5 steps, 2,000 points with a late spike: window 20, sigma 4
    "interval 5, spike": ([3.0] * 1997 + [3.5] * 3, 5, 4.0, 3.2722029573066966),
    # every 10 steps, 1,000 points: window 10, sigma 1
    "interval 10": ([0.0] * 999 + [1.0], 10, 1.0, 0.6409149150126985),
}


@pytest.mark.parametrize("name", CASES)
def test_matches_the_released_definition(name):
    y, interval, sigma, expected = CASES[name]
    assert smoothing_sigma(len(y), interval) == sigma
    assert _by_hand(y, sigma) == pytest.approx(expected, rel=1e-13)  # the literal is right
    assert smoothed_final_loss(y, interval) == pytest.approx(expected, rel=1e-12)


def test_old_floor_and_step_window_are_gone():
    """The former definition (window 1% of steps, sigma >= 1) gave sigma 10 for this series."""
    assert smoothing_sigma(1000, 10) == 1.0
    assert smoothing_sigma(10, 1) == pytest.approx(0.1)
    assert smoothing_sigma(10**6, 5) == 20.0


def test_edge_cases():
    assert math.isnan(smoothed_final_loss([], 1))
    assert smoothed_final_loss([3.0, float("nan"), 2.0], 1) == math.inf
    assert smoothed_final_loss([2.5], 1) == 2.5  # one point: the loss itself
    with pytest.raises(ValueError, match="log_interval"):
        smoothing_sigma(10, 0)
