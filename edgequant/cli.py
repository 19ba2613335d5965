"""The ``edgequant`` command: a thin click layer; each command calls one library function.

User errors (``EdgeQuantError``) print one line ``error: ...`` on stderr and exit 1; ``--debug`` shows the
traceback. Usage errors exit 2 (click's convention).
"""

from __future__ import annotations

import errno
import functools
import logging
import sys
from pathlib import Path

import click

from .errors import EdgeQuantError, UsageError, cli_spelling

__all__ = ["main"]


def _interrupt(exc: BaseException) -> bool:
    """True for Ctrl-C, also when it struck inside an import and came out as another error (ImportError:
    initialization failed)."""
    seen = 0
    while exc is not None and seen < 20:
        if isinstance(exc, KeyboardInterrupt):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def _interrupted(since: int) -> None:
    """One line saying what Ctrl-C left on disk (bundles written completely since ``since``), then exit 130."""
    from .bundle import atomic

    written = atomic.committed_writes[since:]
    click.echo(f"interrupted: {written[-1]} holds the complete new bundle" if written else
               "interrupted: nothing was written", err=True)
    sys.exit(130)


def _handle_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .bundle import atomic

        ctx = click.get_current_context()
        debug = ctx.find_root().params.get("debug", False)
        since = len(atomic.committed_writes)
        try:
            with cli_spelling():
                return fn(*args, **kwargs)
        except UsageError as exc:  # options that do not fit together: click's usage error, exit 2
            if debug:
                raise
            raise click.UsageError(str(exc), ctx=ctx) from None
        except EdgeQuantError as exc:
            if debug:
                raise
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)
        except MemoryError:
            if debug:
                raise
            click.echo("error: out of memory (nothing was written): free memory, or calibrate on fewer samples "
                       "(--num-samples)", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            _interrupted(since)
        except OSError as exc:  # a full disk, a folder that is not writable: the cause and where, in one line
            if debug:
                raise
            why = "the disk is full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else (exc.strerror or str(exc))
            click.echo(f"error: {why}" + (f": {exc.filename}" if exc.filename else ""), err=True)
            sys.exit(1)
        except Exception as exc:
            if _interrupt(exc) and not debug:
                _interrupted(since)
            raise

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--debug", is_flag=True, help="Show full tracebacks for errors.")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug logs).")
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=lambda ctx, _, value:
              _show_version(ctx, value),
              help="Show the versions of edgequant, onnxruntime, onnx and torch and the CPU's int8 features, and exit.")
def cli(debug: bool, verbose: int) -> None:
    """edgequant: trained PyTorch model in, fast and accurate int8 ONNX bundle for edge devices out."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    # Progress lines (edgequant.progress, shown when stderr is not a terminal) are plain text on stderr.
    plog = logging.getLogger("edgequant.progress")
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    plog.handlers[:] = [handler]
    plog.propagate = False
    plog.setLevel(logging.INFO)


def _show_version(ctx: click.Context, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        click.echo(version_text())
        ctx.exit()


def version_text() -> str:
    """edgequant's version, the versions of the libraries a bundle's figures depend on, and what this CPU has for
    int8 (AVX2, VNNI, NEON dot product): paste it into a bug report. Reads package metadata: imports no torch."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    from . import __version__
    from ._runtime.edgequant_runtime import cpu_features, describe_cpu, int8_saturates

    def ver(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    libs = ", ".join(f"{n} {ver(n)}" for n in ("onnxruntime", "onnx", "torch", "numpy"))
    cpu = cpu_features()
    if cpu["arch"] == "x86_64":
        note = ("u8*s8 products summed in pairs in 16 bits: full-range int8 weights saturate (generic-cpu and "
                "x86-avx2 use 7-bit weights)" if int8_saturates(cpu) else "exact 32-bit u8*s8 dot products")
    elif cpu["arch"] == "aarch64":
        note = "int8 dot product (SDOT)" if "asimddp" in cpu["flags"] else "no int8 dot product (int8 gains little)"
    else:
        note = "int8 features not known for this architecture"
    return (f"edgequant {__version__}\n{libs}, python {platform.python_version()}\n"
            f"cpu {describe_cpu(cpu)}: {note} (read from {cpu['source']})")


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
              help="Folder of .npy/.npz/image files (one sample each), or one stacked .npy/.npz file; for a "
                   "Hugging Face text model, a .txt (one sample a line) or .jsonl file.")
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Bundle folder to write.")
@click.option("--target", default=None, metavar="NAME|PATH.toml",
              help="Built-in profile (see `edgequant targets`) or your own .toml.  [default: generic-cpu; with "
                   "--qat-checkpoint, the checkpoint's]")
@click.option("--method", type=click.Choice(["minmax", "percentile", "entropy", "mse", "auto"]), default=None,
              help="How activation ranges are chosen from the calibration data (auto: per tensor, the method with "
                   "the least output error).  [default: minmax]")
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
@click.option("--progress", "progress_bars", is_flag=True,
              help="Draw progress bars even when stderr is not a terminal (default: bars on a terminal, a few "
                   "plain lines elsewhere).")
@click.option("--no-progress", is_flag=True, help="No progress output at all.")
@click.option("-q", "--quiet", is_flag=True,
              help="Print nothing but errors; the exit status says whether the bundle was written (0) or not.")
@click.option("--json", "as_json", is_flag=True,
              help="Print the bundle's summary as one JSON object on stdout (sizes, fidelity, kernels, budget).")
@click.option("--input-shape", "input_shape", multiple=True, metavar="[NAME:]D0,D1,...",
              help="Fix an input's shape, batch axis included (repeatable; static-shape targets default to batch 1 "
                   "and the data's shape).")
@click.option("--qat-checkpoint", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="A file from edgequant.qat.save_checkpoint: export the QAT-trained model (its target and "
                   "learned scales; DATA gives shapes and check samples).")
@click.option("--task", default=None,
              help="Hugging Face models: the task optimum exports (feature-extraction, text-classification, ...; "
                   "text-generation-with-past for a decoder, the default for a causal LM's folder).  [default: "
                   "feature-extraction]")
@click.option("--max-length", type=click.IntRange(2, 8192), default=None,
              help="Text: pad and truncate every sample to this many tokens.  [default: 128]")
@click.option("--dynamic", is_flag=True,
              help="Hugging Face text models: dynamic int8 activations (scales computed per run; no ranges).")
@click.option("--weights", default=None, metavar="q8|q4|q4-gptq",
              help="Weight-only: block-quantize MatMul/Gemm weights to 8 or 4 bits (GPTQ: from the calibration "
                   "data); activations stay float.")
@click.option("--block-size", type=int, default=None, metavar="16|32|64|128|256",
              help="Weight-only: weights per scale along the input axis (default 32; it must divide each weight's "
                   "input size).")
@click.option("--accuracy-budget", default=None, metavar="METRIC>=X|METRIC<=X",
              help="Keep the most sensitive nodes in float until this holds on the held-out samples, e.g. "
              "cosine>=0.995, sqnr>=25, argmax>=99, top1>=97, top1-drop<=0.5 (top1 needs --labels).")
@click.option("--labels", default=None, type=click.Path(dir_okay=False, path_type=Path), metavar="LABELS.npy",
              help="Integer class per calibration sample, in the order the samples are read (sorted names).")
@click.option("--equalize", is_flag=True, help="Cross-layer equalization of Conv pairs before calibration.")
@click.option("--bias-correction", is_flag=True, help="Correct Conv/Gemm biases by the mean int8 output shift.")
@click.option("--smooth-quant", is_flag=True, help="Move MatMul activation outliers into the weights.")
@click.option("--allow-inaccurate", is_flag=True,
              help="Write the bundle even when the int8 model is grossly wrong (the report records it).")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Samples per ONNX Runtime run while calibrating and checking.  [default: 16]")
@click.option("--no-layer-report", is_flag=True, help="Skip the per-layer error table (PTQ).")
@_handle_errors
def export(model, data, out, target, method, num_samples, opset, exclude, resize, scale, mean, std, channels,
           layout, force, progress_bars, no_progress, quiet, as_json, input_shape, qat_checkpoint, task, max_length,
           dynamic, weights, block_size, accuracy_budget, labels, equalize, bias_correction, smooth_quant,
           allow_inaccurate, batch_size, no_layer_report):
    """Quantize MODEL (file.py:factory, package.module:factory, model.onnx or a Hugging Face model folder) to an
    int8 bundle in OUT. Exit status 0: the bundle is written and its check passed; 1: an error, nothing
    written; 2: a usage error."""
    from .progress import progress_style

    if quiet:
        no_progress = True
        logging.getLogger("edgequant").setLevel(logging.ERROR)
    with progress_style("bars" if progress_bars else "auto"):
        bundle = _export(model, data, out, target, method, num_samples, opset, exclude, resize, scale, mean, std,
                         channels, layout, force, no_progress, input_shape, qat_checkpoint, task, max_length, dynamic,
                         weights, block_size, accuracy_budget, labels, equalize, bias_correction, smooth_quant,
                         allow_inaccurate, batch_size, no_layer_report)
    if as_json:
        import json

        click.echo(json.dumps(summary_dict(bundle.report, bundle.path), indent=2))
    elif not quiet:
        click.echo(summary(bundle.report, bundle.path))


def _export(model, data, out, target, method, num_samples, opset, exclude, resize, scale, mean, std, channels,
            layout, force, no_progress, input_shape, qat_checkpoint, task, max_length, dynamic, weights, block_size,
            accuracy_budget, labels, equalize, bias_correction, smooth_quant, allow_inaccurate, batch_size,
            no_layer_report):
    """The export command's options → the same ExportConfig the Python API builds, one flag to one field (a flag
    not given is not passed, so the job's default applies) → the bundle."""
    from ._memory import release_freed_buffers
    from .config import ExportConfig

    release_freed_buffers()
    from .errors import BudgetError
    from .jobs import run_job

    options = dict(target=target, method=method, num_samples=num_samples, opset=opset, exclude_nodes=exclude,
                   preprocess=_preprocess(resize, scale, mean, std, channels, layout),
                   input_shapes=_input_shapes(input_shape), qat_checkpoint=qat_checkpoint, task=task,
                   max_length=max_length, dynamic=dynamic or None, weights=weights, block_size=block_size,
                   accuracy_budget=accuracy_budget, labels=labels,
                   algorithms=_algorithms(equalize, bias_correction, smooth_quant),
                   allow_inaccurate=allow_inaccurate or None, batch_size=batch_size,
                   layer_report=False if no_layer_report else None)
    try:
        config = ExportConfig.from_options(model, data, out=out, force=force, progress=not no_progress,
                                           **{k: v for k, v in options.items() if v not in (None, ())})
    except BudgetError as exc:
        raise click.BadParameter(str(exc), param_hint="--accuracy-budget") from None
    return run_job(config)


def _preprocess(resize, scale, mean, std, channels, layout):
    """The image options → an ImagePreprocess (None when none is given: the data's own defaults)."""
    if all(v is None for v in (resize, scale, mean, std, channels, layout)):
        return None
    from .data.samples import ImagePreprocess

    return ImagePreprocess(resize=_size(resize), scale=_number(scale) if scale else 1 / 255,
                           mean=_floats(mean) or (0.0,), std=_floats(std) or (1.0,), channel_order=channels or "rgb",
                           layout=layout or "nchw")


def _input_shapes(texts):
    from .frontend.shapes import parse_input_shape

    return dict(parse_input_shape(t) for t in texts) or None


def _algorithms(equalize, bias_correction, smooth_quant):
    if not (equalize or bias_correction or smooth_quant):
        return None
    from .transforms.algorithms import Algorithms

    return Algorithms(equalize=equalize, bias_correction=bias_correction, smooth_quant=smooth_quant)


def summary_dict(report: dict, path: Path) -> dict:
    """A bundle report → the JSON the export command prints with --json: the figures a script checks."""
    from .units import precision_label

    keys = ("target", "source", "method", "bundle_digest", "sizes", "fidelity", "kernels", "weights",
            "accuracy_budget", "qat")
    return {"bundle": str(path), "precision": precision_label(report),
            **{k: report[k] for k in keys if report.get(k) is not None}}


def summary(report: dict, path: Path) -> str:
    """A bundle report → a short terminal table."""
    from .units import format_bytes, precision_label

    s = report["sizes"]
    lines = [f"bundle   {path}  (target {report['target']}, {report['source']}, method {report['method']})",
             f"size     fp32 {format_bytes(s['fp32_bytes'])} -> {precision_label(report)} "
             f"{format_bytes(s['int8_bytes'])} ({100 * s['ratio']:.1f}%)"]
    if report.get("bundle_digest"):  # what an app pins (runtimes/README.md, "Pinning a bundle")
        lines.insert(1, f"digest   {report['bundle_digest']}")
    for f in report["fidelity"]:
        agree = f"  argmax agreement {100 * f['argmax_agreement']:.2f}%" if f.get("argmax_agreement") is not None \
            else ""
        if f.get("pixel_argmax_agreement") is not None:
            agree += f"  per-pixel argmax agreement {100 * f['pixel_argmax_agreement']:.2f}%"
        if f.get("spearman_pairwise") is not None:
            agree += f"  pairwise-similarity Spearman {f['spearman_pairwise']:.5f}"
        if f.get("cosine") is None:
            lines.append(f"output   {f['output']}: {f.get('status', 'not checked')}: {f.get('note', '')}")
            continue
        sq = f"  SQNR {f['sqnr_db']:.1f} dB" if f.get("sqnr_db") is not None else ""
        lines.append(f"output   {f['output']}: cosine {f['cosine']:.5f}{sq}  max|err| {f['max_abs_error']:.4g} "
                     f"(|fp32| max {f['fp32_abs_max']:.4g}){agree}  on {f['samples']} held-out samples")
        for p in f.get("parts", []):
            lines.append(f"  part   {p['name']}: SQNR {p['sqnr_db']:.1f} dB  correlation {p['correlation']:.4f}  "
                         f"max|err| {p['max_abs_error']:.4g} (|fp32| max {p['fp32_abs_max']:.4g})")
    lines += _arithmetic_lines(report)
    gate = report.get("fidelity_gate")
    if gate and gate.get("failures"):
        lines.append(f"WARNING  written despite a grossly wrong int8 model (allow_inaccurate): {gate['failures'][0]}")
    det = report.get("detection")
    if det:
        lines.append(f"detect   {det['summary']}")
    g = report.get("generation")
    if g and g.get("samples"):
        lines.append(f"text     {g['samples']} held-out texts ({g['tokens']} tokens): perplexity {g['perplexity']:.3f} "
                     f"(fp32 {g['perplexity_fp32']:.3f}), KL {g['kl_nats']:.4g} nats/token, next token as fp32 "
                     f"{100 * g['next_token_agreement']:.1f}%")
        if g.get("greedy_match") is not None:
            lines.append(f"greedy   {g['greedy_tokens']} new tokens: {100 * g['greedy_match']:.1f}% the same as "
                         f"fp32, {100 * g['greedy_prefix']:.1f}% before the first difference")
    w = report.get("weights")
    if w:
        lines.append(f"weights  {w['layers']} MatMul weights {w['bits']}-bit in blocks of {w['block_size']} "
                     f"({w['method']}): {format_bytes(w['fp32_bytes'])} -> {format_bytes(w['quantized_bytes'])} "
                     f"({100 * w['ratio']:.1f}%)")
    lines += _kernel_choice_lines(report)
    lines += [f"undone   rewrite {r['name']}: {r['reason']}" for r in report.get("passes") or []
              if r["outcome"] == "undone"]
    k = report.get("kernels")
    if k:
        ops = ", ".join(f"{op} {n}" for op, n in k["int8"].items()) or "none"
        lines.append(f"int8     {k['int8_nodes']} nodes run in int8 on the CPU provider: {ops}")
        if k["float_compute"]:
            lines.append(f"float    still float: {', '.join(k['float_compute'][:8])}"
                         + (" ..." if len(k["float_compute"]) > 8 else ""))
        else:
            lines.append("float    no Conv/MatMul/Gemm left in float")
    if report.get("layers"):
        w = report["layers"][0]
        where = ", ".join(v for v in (w["node"], w["module"]) if v) or "graph input"
        lines.append(f"layers   worst alone: {w['tensor']} ({where}) {w['alone_sqnr_db']:.1f} dB SQNR; "
                     f"all {len(report['layers'])} in `edgequant inspect {path} --layers` and report.html")
    for a in (report.get("qat") or {}).get("agreement", []):
        steps = f", max|diff| {a['max_abs_error_steps']:.2f} output steps" if a.get("max_abs_error_steps") is not None \
            else f", max|diff| {a['max_abs_error']:.4g}"
        agree = f"argmax agreement {100 * a['argmax_agreement']:.2f}%" if a.get("argmax_agreement") is not None \
            else f"cosine {a['cosine']:.5f}"
        lines.append(f"qat      {a['output']} vs the QAT model in PyTorch: {agree}{steps}")
    if report.get("accuracy_budget"):
        from .check.budget import describe

        lines += describe(report["accuracy_budget"])
    return "\n".join(lines)


def _kernel_choice_lines(report: dict) -> list[str]:
    """The graph changes made for the target's fast int8 kernels (docs/targets.md), as one line, or none."""
    a = report.get("algorithms") or {}
    parts = []
    dw = a.get("padded_depthwise") or []
    if dw:
        parts.append(f"{len(dw)} depthwise convolution{'s' * (len(dw) > 1)} padded to "
                     f"{', '.join(sorted({str(d['padded']) for d in dw}, key=int))} channels")
    parts += [f"input {i['input']} padded from {i['channels']} to {i['padded']} channels" for i in
              a.get("padded_inputs") or []]
    if a.get("int8_hardsigmoid"):
        parts.append(f"{a['int8_hardsigmoid']} HardSigmoid as int8 Add")
    lines = [f"kernels  for the target's int8 kernels: {'; '.join(parts)}"] if parts else []
    return lines + _choices_line(report.get("kernel_choices"))


def _choices_line(c: dict | None) -> list[str]:
    """report.json's kernel_choices → one line: each choice decided, its gain, the set against plain int8."""
    if not c or all(d["how"] == "not applicable" for d in c["decisions"]):
        return []
    each = [f"{d['key']} {'kept' if d['kept'] else 'off'}" + (f" ({d['ratio']:.3f}x)" if d["ratio"] else "")
            + (" as the profile asks" if d["how"] == "explicit" else "")
            for d in c["decisions"] if d["how"] != "not applicable"]
    how = f"measured on {c['host_cpu']}" if c["method"] == "measured" else "by the cost model (docs/targets.md)"
    tail = f"; together {c['ratio_vs_plain']:.3f}x plain int8" if c.get("ratio_vs_plain") is not None else ""
    tail += f"; {c['fallback']}" if c.get("fallback") else ""
    return [f"choices  {how}: {', '.join(each)}{tail}"]


def _arithmetic_lines(report: dict) -> list[str]:
    """report.json's checked_with (and host_kernels, when this machine would compute differently) → lines."""
    c = report.get("checked_with")
    if not c:
        return []
    lines = [f"checked  in {c['arithmetic']} arithmetic (onnxruntime level {c['onnxruntime_level']}) on "
             f"{c['host_cpu_label']}: {c['reason']}"]
    h = report.get("host_kernels")
    if h:
        here, there = h["fidelity"][0], report["fidelity"][0]
        cos = lambda f: "n/a" if f.get("cosine") is None else f"{f['cosine']:.5f}"  # noqa: E731 (degenerate output)
        lines.append(f"host     this machine ({h['cpu']}) would run this bundle at cosine {cos(here)}; the "
                     f"target computes {cos(there)} — {h['advice']}")
    return lines


@cli.command()
@_handle_errors
def targets():
    """List the built-in target profiles."""
    from .targets import list_targets

    rows = [(t.name, ">".join(p.name.removesuffix("ExecutionProvider") for p in t.runtime.providers),
             t.description) for t in list_targets()]
    width = max(len(name) for name, _, _ in rows)
    for name, chain, description in rows:
        click.echo(f"{name:<{width}}  {chain:<18} {description}")


@cli.command()
@click.argument("bundle", type=click.Path(file_okay=False, path_type=Path))
@click.option("--target", default=None, metavar="NAME|PATH.toml",
              help="Inspect for another target than the bundle's own (what would run where).")
@click.option("--layers", is_flag=True, help="Also the per-layer error table (SQNR of each quantized tensor), worst "
              "first.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@_handle_errors
def inspect(bundle, target, layers, as_json):
    """Show which nodes of BUNDLE run in int8 and which in float on its target's providers, and why; with --layers,
    where the quantization error comes from."""
    import json

    from .check.layers import format_layers
    from .inspection import inspect_bundle

    from .bundle.core import load_bundle

    loaded = load_bundle(bundle)
    result = inspect_bundle(loaded, target=target)
    report = None
    if layers:
        report = loaded.report.get("layers")
        if not report:
            raise EdgeQuantError(f"{bundle}: report.json has no per-layer table; export the bundle again with "
                                 "this edgequant to get one")
    if as_json:
        data = result.to_dict()
        data["digest"] = loaded.digest
        if layers:
            data["layers"] = report
        click.echo(json.dumps(data, indent=2))
        return
    click.echo(f"digest   {loaded.digest}")
    click.echo("\n".join(result.lines()))
    if layers:
        click.echo("")
        click.echo(format_layers(report))


@cli.command()
@click.argument("bundle", type=click.Path(file_okay=False, path_type=Path))
@click.option("--key", "key", required=True, type=click.Path(dir_okay=False, path_type=Path), metavar="KEY.pem",
              help="Ed25519 private key (PEM, e.g. from `openssl genpkey -algorithm ed25519`).")
@_handle_errors
def sign(bundle, key):
    """Sign BUNDLE's manifest with an Ed25519 key (writes manifest.sig); devices check it with the public key."""
    from .bundle.sign import sign_bundle

    digest, public = sign_bundle(bundle, key)
    click.echo(f"signed   {bundle} ({digest}) with Ed25519 key {public}")


def _ints(text: str, what: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        values = ()
    if not values or any(v < 1 for v in values):
        raise click.BadParameter(f"{text!r} is not a comma-separated list of positive integers, e.g. 1,8",
                                 param_hint=what)
    return values


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--batch", default="1", show_default=True, metavar="B[,B...]", help="Batch sizes, e.g. 1,8.")
@click.option("--threads", default="1", show_default=True, metavar="T[,T...]", help="Intra-op threads, e.g. 1,2.")
@click.option("--provider", default="CPUExecutionProvider", show_default=True, help="ONNX Runtime execution provider.")
@click.option("--runs", type=click.IntRange(min=1), default=None,
              help="Timed runs per model (default 50; decoder bundles: 3 generations).")
@click.option("--prompt-tokens", type=click.IntRange(min=1), default=128, show_default=True,
              help="Decoder bundles: tokens in the prompt processed in one step.")
@click.option("--new-tokens", type=click.IntRange(min=2), default=64, show_default=True,
              help="Decoder bundles: tokens then generated one by one.")
@click.option("--warmup", type=click.IntRange(min=0), default=5, show_default=True, help="Untimed runs first.")
@click.option("--no-memory", is_flag=True, help="Skip the peak-memory measurement (one process per model).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the result as JSON to this file.")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write a PNG plot of the latencies to this file.")
@_handle_errors
def bench(model, batch, threads, provider, runs, prompt_tokens, new_tokens, warmup, no_memory, json_out, plot):
    """Latency, throughput and peak memory of a bundle (fp32 vs int8, interleaved) or of one MODEL.onnx; for a
    decoder bundle, prompt latency, per-token latency, tokens/s and peak memory of fp32 and the quantized model."""
    import json

    from .bench import bench as run_bench
    from .bench import format_bench

    generation = _generation_bundle(model)
    if generation is not None:
        from .bench_generation import bench_generation, format_generation

        models, spec, preset = generation
        result = bench_generation({"fp32": models[0], preset: models[1]}, spec, name=str(model),
                                  threads=_ints(threads, "--threads"), prompt_tokens=prompt_tokens,
                                  new_tokens=new_tokens, runs=runs or 3, warmup=min(warmup, 1),
                                  memory=not no_memory).to_dict()
        click.echo(format_generation(result))
        if json_out:
            json_out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        return
    runs = runs or 50
    result = run_bench(model, batches=_ints(batch, "--batch"), threads=_ints(threads, "--threads"),
                       provider=provider, runs=runs, warmup=warmup, memory=not no_memory).to_dict()
    click.echo(format_bench(result))
    if json_out:
        json_out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    if plot:
        from .bundle.render import bench_png

        png = bench_png(result)
        if png is None:
            logging.getLogger(__name__).warning("matplotlib is not installed: no plot written to %s", plot)
        else:
            plot.write_bytes(png)


def _generation_bundle(path: Path):
    """A decoder bundle → ((fp32 path, quantized path), its generation entry, the preset); else None."""
    from .bundle.core import MANIFEST, load_bundle

    if not (path.is_dir() and (path / MANIFEST).is_file()):
        return None
    b = load_bundle(path)
    if not b.manifest.get("generation") or b.fp32_model_path is None:
        return None
    return (b.fp32_model_path, b.model_path), b.manifest["generation"], b.report.get("method", "quantized")


def main() -> None:
    import signal
    import threading

    main_thread = threading.current_thread() is threading.main_thread()
    if main_thread:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _run_cli()
    finally:  # the outcome (and its exit status) is decided: a Ctrl-C while Python shuts down changes nothing
        if main_thread:
            signal.signal(signal.SIGINT, signal.SIG_IGN)


def _run_cli() -> None:
    try:
        cli(prog_name="edgequant", standalone_mode=False)
    except click.exceptions.Abort:  # Ctrl-C outside a command (while options are read)
        _interrupted(0)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        _interrupted(0)
    except Exception as exc:  # a defect: one line; --debug shows the traceback
        if _interrupt(exc):
            _interrupted(0)
        if "--debug" in sys.argv[1:]:
            raise
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        click.echo(f"error: internal error {type(exc).__name__}: {first} (run with --debug for the traceback)",
                   err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
