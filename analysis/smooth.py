"""The smoothed final loss: re-exported from steplaw_train.smoothing, the one definition.

The trainer writes it into result.json and the analysis recomputes it from metrics.jsonl with
the same function, so both agree by construction (see that module for the definition).
"""

from steplaw_train.smoothing import (
    WINDOW_FRACTION,
    WINDOW_MAX,
    smoothed_final_loss,
    smoothing_sigma,
)

__all__ = ["WINDOW_FRACTION", "WINDOW_MAX", "smoothed_final_loss", "smoothing_sigma"]
