"""Peak memory of one model, measured in a fresh process: run as a script (``python _memprobe.py SPEC``), never
imported, so that nothing else edgequant loads is counted.

SPEC (JSON): {"model": path, "provider": name, "inputs": {name: [shape, dtype]}, "runs": n}, or for a decoder
"generation": {"spec": the manifest's generation entry, "module": path of edgequant_generate.py,
"prompt_tokens": n, "new_tokens": n} instead of inputs. Prints JSON
{"baseline_kib", "peak_kib", "method"}: the resident set size after Python, numpy, onnxruntime and the inputs
are loaded, and the highest resident set size while the session is created and ``runs`` inferences run
(Linux: the kernel's high-water mark VmHWM, reset just before the model is loaded; elsewhere ru_maxrss, which
also counts the imports).
"""

import json
import sys

import numpy as np
import onnxruntime as ort


def _status_kib(key):
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


class _NoText:
    def decode(self, ids, skip_special_tokens=True):
        return ""


def main():
    spec = json.loads(sys.argv[1])
    rng = np.random.default_rng(0)
    inputs = {}
    for name, (shape, dtype) in spec["inputs"].items():
        dt = np.dtype(dtype)
        inputs[name] = (rng.integers(0, 100, shape) if dt.kind in "iu" else rng.standard_normal(shape)).astype(dt)
    module = None
    if spec.get("generation"):  # imported before the baseline, like numpy and onnxruntime
        import importlib.util

        mspec = importlib.util.spec_from_file_location("_edgequant_generate_probe", spec["generation"]["module"])
        module = importlib.util.module_from_spec(mspec)
        sys.modules[mspec.name] = module
        mspec.loader.exec_module(module)
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # reset VmHWM to the current RSS
        baseline, method = _status_kib("VmRSS"), "VmHWM"
    except OSError:
        import resource

        baseline, method = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "ru_maxrss"
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    session = ort.InferenceSession(spec["model"], so, providers=[spec["provider"]])
    gen = spec.get("generation")
    if gen:  # a decoder: a prompt, then tokens one by one with the key/value cache, through the device's generator
        generator = module.Generator(session, "", {"generation": gen["spec"]}, tokenizer=_NoText())
        prompt = rng.integers(1, 100, int(gen["prompt_tokens"])).tolist()
        for _ in range(spec["runs"]):
            generator.generate(prompt, int(gen["new_tokens"]), do_sample=False)
    for _ in range(spec["runs"] if not gen else 0):
        session.run(None, inputs)
    if method == "VmHWM":
        peak = _status_kib("VmHWM")
    else:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak = peak // 1024 if sys.platform == "darwin" else peak
    print(json.dumps({"baseline_kib": baseline, "peak_kib": peak, "method": method}))


if __name__ == "__main__":
    main()
