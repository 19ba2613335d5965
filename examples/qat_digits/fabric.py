"""QAT under Lightning Fabric: the 3-bit digits_dw fine-tuning of `qat_digits.py`, with the module and optimizer
set up by Fabric (CPU, one device), then saved as a checkpoint and exported.

    python examples/qat_digits/fabric.py [--epochs 2] [--out build/qat_digits_fabric]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import qat_digits  # noqa: E402  (this folder)


def run(out: Path, *, epochs: int = 2, lr: float = 1e-3, batch_size: int = 64, log=print):
    """Prepare, train with Fabric, save ``checkpoint.pt`` and export the bundle → (Fabric module, bundle)."""
    from lightning_fabric import Fabric

    from edgequant import qat

    torch.set_num_threads(1)
    fabric = Fabric(accelerator="cpu", devices=1)
    fabric.seed_everything(0, verbose=False)
    x_tr, y_tr, x_te, _ = qat_digits.dw.load_split()
    qmodel = qat.prepare(qat_digits.dw.build(), torch.from_numpy(x_tr[:32]), target="generic-cpu", weight_bits=3,
                         calibration=qat_digits.CALIBRATION)
    model = fabric.setup_module(qmodel)
    opt = fabric.setup_optimizers(torch.optim.Adam(model.parameters(), lr=lr))
    loader = fabric.setup_dataloaders(torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.from_numpy(x_tr), torch.from_numpy(y_tr)), batch_size=batch_size,
        shuffle=True))
    for epoch in range(epochs):
        if epoch == epochs - 1:
            qat.freeze_observers(model)
        model.train()
        total = 0.0
        for x, y in loader:
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            fabric.backward(loss)
            opt.step()
            total += loss.item() * len(y)
        log(f"epoch {epoch + 1}/{epochs}  loss {total / len(x_tr):.4f}")
    out.mkdir(parents=True, exist_ok=True)
    qat.save_checkpoint(model, out / "checkpoint.pt")
    bundle = qat.export(model, out=out / "bundle", calibration=x_te, force=True, progress=False)
    return model, bundle


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("build/qat_digits_fabric"))
    args = parser.parse_args()
    _, bundle = run(args.out, epochs=args.epochs)
    agree = bundle.report["qat"]["agreement"][0]
    print(f"Fabric QAT bundle {bundle.path}: argmax agreement with the PyTorch model "
          f"{100 * agree['argmax_agreement']:.2f}%, max |diff| {agree['max_abs_error_steps']:.2f} output steps")
    print(f"then: edgequant export examples/digits_dw/model.py:build --calibrate examples/digits/data "
          f"--qat-checkpoint {args.out / 'checkpoint.pt'} -o {args.out / 'cli'}")


if __name__ == "__main__":
    main()
