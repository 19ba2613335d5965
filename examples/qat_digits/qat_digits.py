"""Quantization-aware training where post-training quantization falls short: the depthwise-separable digits CNN
(`examples/digits_dw`) with 3-bit weights (15 levels per output channel, stored in int8) on the default target.

    python examples/qat_digits/qat_digits.py [--epochs 4] [--weight-bits 3] [--target generic-cpu]
                                             [--out build/qat_digits]

Prints the epoch progress and a table of test-split accuracy: the fp32 model in PyTorch, the PTQ bundle (same
quantizers, ranges calibrated on `examples/digits/data`, no training) and the QAT bundle (fine-tuned with the
quantizers in the loop), both int8 bundles run by ONNX Runtime. Seeded and single-threaded: reproducible.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
EXAMPLES = HERE.parent
CALIBRATION = EXAMPLES / "digits" / "data"


def _load(path: Path, name: str):
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


dw = _load(EXAMPLES / "digits_dw" / "model.py", "_qat_digits_dw_model")
evaluate = _load(EXAMPLES / "digits" / "evaluate.py", "_qat_digits_evaluate")


def train(qmodel: nn.Module, x: np.ndarray, y: np.ndarray, *, epochs: int = 4, lr: float = 1e-3,
          batch_size: int = 64, seed: int = 0, log: Callable[[str], None] = print,
          test_accuracy: Callable[[nn.Module], float] | None = None) -> nn.Module:
    """A plain training loop (Adam, cosine schedule) on a prepared module; the observers are frozen for the last
    epoch, so that it trains with the ranges the device will use."""
    from edgequant import qat

    torch.manual_seed(seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.Adam(qmodel.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    for epoch in range(epochs):
        if epoch == epochs - 1:
            qat.freeze_observers(qmodel)
        qmodel.train()
        perm = torch.randperm(len(xt))
        total = 0.0
        for i in range(0, len(xt), batch_size):
            idx = perm[i:i + batch_size]
            loss = nn.functional.cross_entropy(qmodel(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        sched.step()
        line = f"epoch {epoch + 1}/{epochs}  loss {total / len(xt):.4f}"
        if test_accuracy is not None:
            line += f"  test acc (PyTorch, fake-quant) {test_accuracy(qmodel.eval()):.2f}%"
        log(line)
    return qmodel.eval()


def run(out: Path, *, epochs: int = 4, weight_bits: int = 3, target: str = "generic-cpu",
        log: Callable[[str], None] = print) -> dict:
    """fp32, PTQ and QAT accuracy (percent, test split) and the two bundles."""
    from edgequant import qat

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    x_tr, y_tr, x_te, y_te = dw.load_split()
    model = dw.build()
    fp32 = evaluate.accuracy(evaluate.torch_runner(model), x_te, y_te)
    example = torch.from_numpy(x_tr[:32])
    settings = dict(target=target, weight_bits=weight_bits, calibration=CALIBRATION)
    ptq = qat.export(qat.prepare(model, example, **settings), out=out / "ptq", calibration=x_te, force=True,
                     progress=False)
    qmodel = qat.prepare(model, example, **settings)
    start = time.perf_counter()
    train(qmodel, x_tr, y_tr, epochs=epochs, log=log,
          test_accuracy=lambda m: evaluate.accuracy(evaluate.torch_runner(m), x_te, y_te))
    seconds = time.perf_counter() - start
    bundle = qat.export(qmodel, out=out / "qat", calibration=x_te, force=True, progress=False)
    qat.save_checkpoint(qmodel, out / "checkpoint.pt")  # for `edgequant export ... --qat-checkpoint`
    return {
        "fp32": fp32,
        "ptq": evaluate.accuracy(evaluate.onnx_runner(ptq.path / "model.onnx"), x_te, y_te),
        "qat": evaluate.accuracy(evaluate.onnx_runner(bundle.path / "model.onnx"), x_te, y_te),
        "train_s": seconds, "ptq_bundle": ptq, "qat_bundle": bundle, "qmodel": qmodel,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--weight-bits", type=int, default=3)
    parser.add_argument("--target", default="generic-cpu")
    parser.add_argument("--out", type=Path, default=Path("build/qat_digits"))
    args = parser.parse_args()
    r = run(args.out, epochs=args.epochs, weight_bits=args.weight_bits, target=args.target)
    agree = r["qat_bundle"].report["qat"]["agreement"][0]
    bits = f"{args.weight_bits}-bit weights, target {args.target}"
    print(f"\ntest accuracy (450 digits)   {bits}")
    print(f"  fp32 (PyTorch)             {r['fp32']:6.2f}%")
    print(f"  PTQ  (int8 bundle, ORT)    {r['ptq']:6.2f}%")
    print(f"  QAT  (int8 bundle, ORT)    {r['qat']:6.2f}%   ({args.epochs} epochs, {r['train_s']:.1f} s)")
    print(f"QAT bundle vs QAT model in PyTorch: argmax agreement {100 * agree['argmax_agreement']:.2f}%, "
          f"max |diff| {agree['max_abs_error_steps']:.2f} output steps; bundles and checkpoint.pt in {args.out}")


if __name__ == "__main__":
    main()
