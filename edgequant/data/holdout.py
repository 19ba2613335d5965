"""Which samples calibrate and which check: every 5th sample (at most ``MAX_HOLDOUT``, 1,000) is held out for the
checks; calibration uses the rest (the first N of them with ``num_samples``). Every job splits the same way, so
a sample's role does not depend on the job."""

from __future__ import annotations

from .samples import Samples

__all__ = ["MAX_HOLDOUT", "holdout_indices", "sample_ids", "split_holdout"]

MAX_HOLDOUT = 1000


def holdout_indices(n: int) -> list[int]:
    """Indices of the held-out samples among ``n`` (all of them when fewer than 5)."""
    return list(range(n)) if n < 5 else [i for i in range(n) if i % 5 == 4][:MAX_HOLDOUT]


def split_holdout(samples: Samples, num_samples: int | None) -> tuple[Samples, Samples]:
    """Samples → (calibration, held-out). With fewer than 5 samples there is nothing to spare: both use all."""
    n = len(samples)
    if n < 5:
        return samples, samples
    held = holdout_indices(n)
    held_set = set(held)
    calib = [i for i in range(n) if i not in held_set]
    if num_samples is not None:
        calib = calib[:num_samples]
    return samples.subset(calib), samples.subset(held)


def sample_ids(samples: Samples) -> list[str]:
    """Samples → their ids (file name and index), as the report and error messages name them."""
    return [samples.label(i) for i in range(len(samples))]
