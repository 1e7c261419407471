"""int8 activation ranges, one rule for every runtime: each activation's range is the 5th percentile of
the calibration images' own minima to the 95th percentile of their maxima (always holding 0).

The plain min / max over all images lets one unusual photo set the range for everyone: on the
quickstart model one PhotoTourism photo (of the 69 real photos) widens the residual stream of
MobileNetV2's 160-channel stage 7x, and min cosine to fp32 drops to 0.983 on the real photos (0.995
with these ranges). A moving average of the per-image ranges (ai-edge-quantizer's default, smoothing
0.95) clips typical images too (min cosine 0.89).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from export.errors import ExportError

RANGE_QUANTILE = 0.95
RANGE_RULE = (f"per tensor: {1 - RANGE_QUANTILE:.0%} percentile of the images' minima to "
              f"{RANGE_QUANTILE:.0%} percentile of their maxima")  # recorded in manifest.json


def percentile_range(mins: Sequence, maxs: Sequence) -> tuple[np.ndarray, np.ndarray]:
    """Per-image minima and maxima of one tensor (scalars or equal-shape arrays, one per image) ->
    (low, high) at RANGE_QUANTILE, low <= 0 <= high, in the inputs' dtype."""
    mins, maxs = np.stack([np.asarray(m) for m in mins]), np.stack([np.asarray(m) for m in maxs])
    if len(mins) == 0 or len(mins) != len(maxs):
        raise ExportError(f"need one min and one max per calibration image, got {len(mins)} and {len(maxs)}")
    lo = np.minimum(np.quantile(mins, 1 - RANGE_QUANTILE, axis=0), 0.0)
    hi = np.maximum(np.quantile(maxs, RANGE_QUANTILE, axis=0), 0.0)
    return lo.astype(mins.dtype), hi.astype(maxs.dtype)
