"""Run ONNX models with ONNX Runtime's CPU provider on saved inputs; save outputs and ORT's optimized graph.

The one piece of code both sides of ``compare.py`` run: imported on the x86 host, and executed as a script by the
emulated aarch64 python (``ROOT_DIR/python run_ort.py job.json``), so both use identical session settings. It
needs only numpy and onnxruntime, because that is all the aarch64 environment has (no onnx).

job.json: {"threads": 1, "level": "all", "info": "info.json",
           "runs": [{"model": "m.onnx", "inputs": "in.npz", "outputs": "out.npz", "optimized": "opt.onnx"}]}
"""

from __future__ import annotations

import json
import platform
import sys

import numpy as np
import onnxruntime as ort

LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def environment() -> dict:
    return {"machine": platform.machine(), "python": platform.python_version(), "numpy": np.__version__,
            "onnxruntime": ort.__version__, "providers": ort.get_available_providers()}


def run_job(job: dict) -> dict:
    for run in job["runs"]:
        so = ort.SessionOptions()
        so.graph_optimization_level = LEVELS[job.get("level", "all")]
        # One thread on both sides: the int8 kernels are deterministic either way, but the float reductions of
        # a threaded GEMM can be split differently, which would add noise unrelated to the architecture.
        so.intra_op_num_threads = job.get("threads", 1)
        so.log_severity_level = 3
        if run.get("optimized"):
            so.optimized_model_filepath = run["optimized"]
        sess = ort.InferenceSession(run["model"], so, providers=["CPUExecutionProvider"])
        with np.load(run["inputs"]) as f:
            feeds = {k: f[k] for k in f.files}
        names = [o.name for o in sess.get_outputs()]
        np.savez(run["outputs"], **dict(zip(names, sess.run(names, feeds))))
    info = environment()
    if job.get("info"):
        with open(job["info"], "w") as f:
            json.dump(info, f)
    return info


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        run_job(json.load(f))
