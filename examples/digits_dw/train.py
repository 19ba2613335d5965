"""Train the depthwise-separable digits CNN with the recipe of `examples/digits/train.py` and write its weights.

    python examples/digits_dw/train.py

Writes `weights.pt` only: calibration samples and images are those of `examples/digits` (same data, same
pre-processing).
"""

from __future__ import annotations

import time

import torch
from model import HERE, DigitsDW, import_digits, load_split  # this folder is first on sys.path


def main() -> None:
    fit = import_digits("train").fit
    evaluate = import_digits("evaluate")
    x_tr, y_tr, x_te, y_te = load_split()
    start = time.perf_counter()
    model = fit(DigitsDW, x_tr, y_tr, epochs=20,
                test_accuracy=lambda m: evaluate.accuracy(evaluate.torch_runner(m), x_te, y_te))
    seconds = time.perf_counter() - start
    torch.save(model.state_dict(), HERE / "weights.pt")
    acc = evaluate.accuracy(evaluate.torch_runner(model), x_te, y_te)
    print(f"fp32 test accuracy {acc:.2f}% (trained in {seconds:.1f} s); wrote weights.pt")


if __name__ == "__main__":
    main()
