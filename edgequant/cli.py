"""The ``edgequant`` command: a thin click layer; each command calls one library function.

User errors (``EdgeQuantError``) print one line ``error: ...`` on stderr and exit 1; ``--debug`` shows the
traceback. Usage errors exit 2 (click's convention).
"""

from __future__ import annotations

import functools
import logging
import sys
from pathlib import Path

import click

from .errors import EdgeQuantError

__all__ = ["main"]


def _handle_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        ctx = click.get_current_context()
        debug = ctx.find_root().params.get("debug", False)
        try:
            return fn(*args, **kwargs)
        except EdgeQuantError as exc:
            if debug:
                raise
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted: nothing was written", err=True)
            sys.exit(130)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--debug", is_flag=True, help="Show full tracebacks for errors.")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug logs).")
@click.version_option(package_name="edgequant")
def cli(debug: bool, verbose: int) -> None:
    """edgequant: trained PyTorch model in, fast and accurate int8 ONNX bundle for edge devices out."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


def _floats(text: str | None) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(_number(v) for v in text.replace(":", ",").split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of numbers") from None


def _number(text: str) -> float:
    text = text.strip()
    if "/" in text:
        num, den = text.split("/", 1)
        return float(num) / float(den)
    return float(text)


def _size(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        h, w = text.lower().split("x")
        return int(h), int(w)
    except ValueError:
        raise click.BadParameter(f"{text!r} is not HEIGHTxWIDTH, e.g. 224x224") from None


@cli.command()
@click.argument("model")
@click.option("--calibrate", "data", required=True, metavar="DATA",
              help="Folder of .npy/.npz/image files (one sample each), or one stacked .npy/.npz file.")
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Bundle folder to write.")
@click.option("--target", default="generic-cpu", show_default=True, metavar="NAME|PATH.toml",
              help="Built-in profile (see `edgequant targets`) or your own .toml.")
@click.option("--method", type=click.Choice(["minmax", "percentile", "entropy", "mse", "auto"]), default="minmax",
              show_default=True, help="How activation ranges are chosen from the calibration data (auto: per "
              "tensor, the method with the least output error).")
@click.option("--num-samples", type=click.IntRange(min=1), default=None,
              help="Calibrate on at most N samples (the held-out check set is kept apart).")
@click.option("--opset", type=click.IntRange(13, 23), default=None, help="ONNX opset (default: the target's).")
@click.option("--exclude", multiple=True, metavar="NODE", help="Keep this ONNX node in float (repeatable).")
@click.option("--resize", default=None, metavar="HxW", help="Images: resize to HEIGHTxWIDTH (bilinear).")
@click.option("--scale", default=None, metavar="S", help="Images: multiply pixels by S (default 1/255).")
@click.option("--mean", default=None, metavar="M[,M,M]", help="Images: subtract per-channel mean (after scale).")
@click.option("--std", default=None, metavar="S[,S,S]", help="Images: divide by per-channel std.")
@click.option("--channels", type=click.Choice(["rgb", "bgr", "gray"]), default=None, help="Images: channel order.")
@click.option("--layout", type=click.Choice(["nchw", "nhwc"]), default=None, help="Images: tensor layout.")
@click.option("--force", is_flag=True, help="Replace OUT if it is not empty.")
@click.option("--no-progress", is_flag=True, help="Hide the calibration progress bar.")
@click.option("--accuracy-budget", default=None, metavar="METRIC>=X|METRIC<=X",
              help="Keep the most sensitive nodes in float until this holds on the held-out samples, e.g. "
              "cosine>=0.995, sqnr>=25, argmax>=99, top1>=97, top1-drop<=0.5 (top1 needs --labels).")
@click.option("--labels", default=None, type=click.Path(dir_okay=False, path_type=Path), metavar="LABELS.npy",
              help="Integer class per calibration sample, in the order the samples are read (sorted names).")
@click.option("--equalize", is_flag=True, help="Cross-layer equalization of Conv pairs before calibration.")
@click.option("--bias-correction", is_flag=True, help="Correct Conv/Gemm biases by the mean int8 output shift.")
@click.option("--smooth-quant", is_flag=True, help="Move MatMul activation outliers into the weights.")
@_handle_errors
def export(model, data, out, target, method, num_samples, opset, exclude, resize, scale, mean, std, channels,
           layout, force, no_progress, accuracy_budget, labels, equalize, bias_correction, smooth_quant):
    """Quantize MODEL (file.py:factory, package.module:factory or model.onnx) to an int8 bundle in OUT."""
    from .algorithms import Algorithms
    from .api import export as run_export
    from .budget import AccuracyBudget
    from .data import ImagePreprocess
    from .errors import BudgetError

    budget = None
    if accuracy_budget is not None:
        try:
            budget = AccuracyBudget.parse(accuracy_budget)
        except BudgetError as exc:
            raise click.BadParameter(str(exc), param_hint="--accuracy-budget") from None

    pre = None
    if any(v is not None for v in (resize, scale, mean, std, channels, layout)):
        pre = ImagePreprocess(
            resize=_size(resize), scale=_number(scale) if scale else 1 / 255,
            mean=_floats(mean) or (0.0,), std=_floats(std) or (1.0,),
            channel_order=channels or "rgb", layout=layout or "nchw")
    bundle = run_export(model, data, out=out, target=target, method=method, num_samples=num_samples, opset=opset,
                        preprocess=pre, exclude_nodes=exclude, force=force, progress=not no_progress,
                        algorithms=Algorithms(equalize=equalize, bias_correction=bias_correction,
                                              smooth_quant=smooth_quant),
                        accuracy_budget=budget, labels=labels)
    click.echo(summary(bundle.report, bundle.path))


def summary(report: dict, path: Path) -> str:
    """A bundle report → a short terminal table."""
    s = report["sizes"]
    lines = [f"bundle   {path}  (target {report['target']}, {report['source']}, method {report['method']})",
             f"size     fp32 {s['fp32_bytes'] / 1024:.1f} KiB -> int8 {s['int8_bytes'] / 1024:.1f} KiB "
             f"({100 * s['ratio']:.1f}%)"]
    for f in report["fidelity"]:
        agree = f"  argmax agreement {100 * f['argmax_agreement']:.2f}%" if f.get("argmax_agreement") is not None \
            else ""
        lines.append(f"output   {f['output']}: cosine {f['cosine']:.5f}  max|err| {f['max_abs_error']:.4g} "
                     f"(|fp32| max {f['fp32_abs_max']:.4g}){agree}  on {f['samples']} held-out samples")
    k = report.get("kernels")
    if k:
        ops = ", ".join(f"{op} {n}" for op, n in k["int8"].items()) or "none"
        lines.append(f"int8     {k['int8_nodes']} nodes run in int8 on the CPU provider: {ops}")
        if k["float_compute"]:
            lines.append(f"float    still float: {', '.join(k['float_compute'][:8])}"
                         + (" ..." if len(k["float_compute"]) > 8 else ""))
        else:
            lines.append("float    no Conv/MatMul/Gemm left in float")
    if report.get("accuracy_budget"):
        from .budget import describe

        lines += describe(report["accuracy_budget"])
    return "\n".join(lines)


@cli.command()
@_handle_errors
def targets():
    """List the built-in target profiles."""
    from .targets import list_targets

    for t in list_targets():
        click.echo(f"{t.name:<16} {t.description}")


def main() -> None:
    cli(prog_name="edgequant")


if __name__ == "__main__":
    main()
