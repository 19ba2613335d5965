"""Real English sentences that ship with Python: the help topics of ``pydoc_data.topics`` (the text behind
``help("assert")`` and friends), split into sentences. Used to calibrate and check text encoders.

    python examples/minilm/sentences.py calib.txt holdout.txt   # writes one sentence a line
"""

from __future__ import annotations

import os
import re
import sys


def sentences() -> list[str]:
    """The help topics → distinct sentences of 40-400 characters that are mostly letters (code listings
    dropped), in a fixed order."""
    from pydoc_data.topics import topics

    text = re.sub(r"\s+", " ", " ".join(topics[k] for k in sorted(topics)))
    parts = re.split(r"(?<=[.!?])\s+", text)
    keep = [p for p in parts if 40 < len(p) < 400 and sum(c.isalpha() for c in p) > 0.7 * len(p)]
    return list(dict.fromkeys(keep))  # some sentences recur across topics


def split() -> tuple[list[str], list[str]]:
    """Sentences → (calibration, held-out): every 4th sentence is held out, so the two never share a sentence."""
    all_ = sentences()
    return [s for i, s in enumerate(all_) if i % 4 != 3], [s for i, s in enumerate(all_) if i % 4 == 3]


if __name__ == "__main__":
    calib, held = split()
    for path, lines in zip(sys.argv[1:3], (calib, held)):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w", encoding="utf-8") as fh:
            fh.write("\n".join(lines) + "\n")
        print(f"{path}: {len(lines)} sentences")
