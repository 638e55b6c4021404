"""The smoothed final loss: the one number per run that every fit in this project uses.

Definition (Step Law paper, Sec. 2, exactly as the authors' released analysis computes it):
Gaussian-smooth the logged training-loss series with scipy's `gaussian_filter1d` (mode
"reflect", scipy's default) and take the value at its last point, where

    window = min(100, 0.01 * number_of_logged_points)
    sigma  = window / log_interval          (no floor)

Units, as the authors' code has them: the 100 is nominally steps and the 1% term is a count of
logged points; the two are compared as plain numbers, and dividing by the log interval (steps
between logged points) gives sigma in logged points, scipy's unit. The units are mixed, but it
is the definition the released `smooth loss` column was computed with, so it is reproduced as
written. Consequences: with fewer than 100 logged points (or a long log interval) sigma is
below one point and the kernel's radius (int(4 sigma + 0.5)) can be 0, i.e. the last logged
loss itself. Non-finite losses make the run's smoothed loss +inf: a diverged run is worse than
any finished one, never missing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy.ndimage import gaussian_filter1d

WINDOW_MAX = 100  # the authors' cap on the window (nominally steps; see the module docstring)
WINDOW_FRACTION = 0.01  # the window's other bound: this fraction of the logged points


def smoothing_sigma(num_points: int, log_interval: int = 1) -> float:
    """Sigma in logged points for a series of `num_points` points logged every `log_interval`
    steps: min(100, 1% of the points) / log_interval, with no floor."""
    if log_interval <= 0:
        raise ValueError(f"log_interval: must be a positive number of steps, got {log_interval}")
    return min(WINDOW_MAX, WINDOW_FRACTION * num_points) / log_interval


def smoothed_final_loss(losses: Sequence[float], log_interval: int = 1) -> float:
    """Last point of the Gaussian-smoothed loss series (inf if any loss is not finite)."""
    y = np.asarray(losses, dtype=np.float64)
    if y.size == 0:
        return math.nan
    if not np.all(np.isfinite(y)):
        return math.inf
    sigma = smoothing_sigma(y.size, log_interval)
    return float(gaussian_filter1d(y, sigma=sigma, mode="reflect")[-1])
