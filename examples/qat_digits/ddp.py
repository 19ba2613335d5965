"""QAT under torch DDP: two processes on one CPU (gloo, localhost) fine-tune the 3-bit digits_dw model of
`qat_digits.py`, each on half of the training split; rank 0 saves the checkpoint and this process exports it.

    python examples/qat_digits/ddp.py [--epochs 2] [--out build/qat_digits_ddp]

Every process prepares the model on the same calibration data, and the activation observers all-reduce their
batch ranges, so all ranks hold the same scales (each rank writes its scales to `scales<rank>.pt` to show it).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import qat_digits  # noqa: E402  (this folder)


def worker(rank: int, world_size: int, port: int, out: str, epochs: int) -> None:
    """One DDP process: prepare, wrap in DistributedDataParallel, train on this rank's shard, save."""
    from torch.nn.parallel import DistributedDataParallel

    from edgequant import qat
    from edgequant.qat.modules import ActQuant

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        x_tr, y_tr, _, _ = qat_digits.dw.load_split()
        qmodel = qat.prepare(qat_digits.dw.build(), torch.from_numpy(x_tr[:32]), target="generic-cpu",
                             weight_bits=3, calibration=qat_digits.CALIBRATION)
        ddp = DistributedDataParallel(qmodel)
        log = print if rank == 0 else (lambda line: None)
        qat_digits.train(ddp, x_tr[rank::world_size], y_tr[rank::world_size], epochs=epochs, seed=rank, log=log)
        scales = {n: m.scale.detach().clone() for n, m in qmodel.named_modules() if isinstance(m, ActQuant)}
        torch.save(scales, Path(out) / f"scales{rank}.pt")
        if rank == 0:
            qat.save_checkpoint(ddp, Path(out) / "checkpoint.pt")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    from edgequant import qat

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("build/qat_digits_ddp"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    mp.spawn(worker, args=(2, free_port(), str(args.out), args.epochs), nprocs=2, join=True)
    x_tr, _, x_te, y_te = qat_digits.dw.load_split()
    qmodel = qat.load_checkpoint(qat_digits.dw.build(), torch.from_numpy(x_tr[:32]), args.out / "checkpoint.pt")
    bundle = qat.export(qmodel, out=args.out / "bundle", calibration=x_te, force=True, progress=False)
    acc = qat_digits.evaluate.accuracy(qat_digits.evaluate.onnx_runner(bundle.path / "model.onnx"), x_te, y_te)
    print(f"DDP QAT bundle {bundle.path}: test accuracy {acc:.2f}% (ONNX Runtime)")


if __name__ == "__main__":
    main()
