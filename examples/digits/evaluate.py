"""Test-split accuracy of a digits model: the PyTorch model and, optionally, exported ONNX files.

    python examples/digits/evaluate.py                                    # fp32 PyTorch, this example
    python examples/digits/evaluate.py --model examples/digits_dw/model.py
    python examples/digits/evaluate.py build/digits/model.onnx build/digits/model.fp32.onnx

Any `model.py` with `build()` and `load_split()` works with `--model`; ONNX files are run with ONNX Runtime on
the same test split.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RunFn = Callable[[np.ndarray], np.ndarray]


def accuracy(run_fn: RunFn, x: np.ndarray, y: np.ndarray, batch_size: int = 256) -> float:
    """Top-1 accuracy in percent of `run_fn` (float32 batch (N, 1, 8, 8) → logits (N, 10)) on `x`, `y`."""
    correct = 0
    for i in range(0, len(x), batch_size):
        logits = np.asarray(run_fn(np.ascontiguousarray(x[i:i + batch_size], dtype=np.float32)))
        correct += int((logits.argmax(1) == y[i:i + batch_size]).sum())
    return 100.0 * correct / len(x)


def torch_runner(model) -> RunFn:
    """A run_fn for a PyTorch module (put in eval mode, run without gradients)."""
    import torch

    model.eval()

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(x)).numpy()

    return run


def onnx_runner(path: str | Path) -> RunFn:
    """A run_fn for an ONNX file with one input and the logits as first output (ONNX Runtime, CPU)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})[0]


def load_model_file(path: str | Path):
    """Import an example's model.py by path, under a name that cannot clash with another example's."""
    path = Path(path).resolve()
    name = f"_digits_evaluate_{path.parent.name}_{path.stem}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("onnx", nargs="*", help="ONNX files to evaluate as well (e.g. a bundle's model.onnx)")
    parser.add_argument("--model", default=str(HERE / "model.py"),
                        help="model.py with build() and load_split() (default: this example's)")
    args = parser.parse_args()

    example = load_model_file(args.model)
    _, _, x_test, y_test = example.load_split()
    print(f"test split: {len(x_test)} samples")
    print(f"{accuracy(torch_runner(example.build()), x_test, y_test):6.2f}%  fp32 PyTorch ({args.model})")
    for path in args.onnx:
        print(f"{accuracy(onnx_runner(path), x_test, y_test):6.2f}%  {path}")


if __name__ == "__main__":
    main()
