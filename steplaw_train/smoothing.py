"""The smoothed final loss: the one number per run that every fit in this project uses.

Definition (Step Law paper, Sec. 2, and the authors' released analysis): Gaussian-smooth the
logged training-loss series and take the value at its last point. The smoothing window is
min(100 steps, 1% of the run's logged steps); sigma, in logged points, is that window divided by
the log interval (at least one point, so that a short run is still smoothed). The filter
reflects at the series' end (scipy's default), so the last point averages the final ~2 sigma
points. Non-finite losses make the run's smoothed loss +inf: a diverged run is worse than any
finished one, never missing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy.ndimage import gaussian_filter1d

WINDOW_STEPS = 100
WINDOW_FRACTION = 0.01


def smoothing_sigma(num_points: int, log_interval: int = 1) -> float:
    """Sigma in logged points for a series of `num_points` points logged every `log_interval`."""
    steps = num_points * log_interval
    window_steps = min(WINDOW_STEPS, WINDOW_FRACTION * steps)
    return max(1.0, window_steps / log_interval)


def smoothed_final_loss(losses: Sequence[float], log_interval: int = 1) -> float:
    """Last point of the Gaussian-smoothed loss series (inf if any loss is not finite)."""
    y = np.asarray(losses, dtype=np.float64)
    if y.size == 0:
        return math.nan
    if not np.all(np.isfinite(y)):
        return math.inf
    sigma = smoothing_sigma(y.size, log_interval)
    return float(gaussian_filter1d(y, sigma=sigma, mode="reflect")[-1])
