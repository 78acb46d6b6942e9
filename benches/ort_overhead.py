"""Measurement overhead of `shrink bench --backend ort` against a plain ONNX Runtime Python
loop on the same model, threads, batch and iteration count, measured side by side.

    python3 benches/ort_overhead.py --shrink target/release/shrink --model fixtures/teacher_wide.onnx \
        --threads 1 --iterations 2000 --rounds 5

Rounds alternate (Python, shrink, Python, shrink, ...) so that drift in machine load hits
both alike. Prints one JSON line: per-round medians, the median of each, and the ratio
shrink / Python (1.00 = no overhead).
"""
import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time

import numpy as np
import onnxruntime as ort


def python_round(model, shape, threads, warmup, iterations):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    s = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    name = s.get_inputs()[0].name
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    for _ in range(warmup):
        s.run(None, {name: x})
    samples = []
    for _ in range(iterations):
        t = time.perf_counter()
        s.run(None, {name: x})
        samples.append((time.perf_counter() - t) * 1e3)
    return statistics.median(samples)


def shrink_round(exe, model, threads, warmup, iterations, batch):
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "r.json")
        subprocess.run([exe, "bench", model, "--backend", "ort", "--threads", str(threads), "--warmup", str(warmup),
                        "--iterations", str(iterations), "--batch-size", str(batch), "--no-memory", "--json", out, "-q"],
                       check=True, stdout=subprocess.DEVNULL)
        with open(out) as f:
            return json.load(f)["models"][0]["latency_ms"]["p50"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shrink", default="target/release/shrink")
    ap.add_argument("--model", default="fixtures/teacher_wide.onnx")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--iterations", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    so = ort.InferenceSession(a.model, providers=["CPUExecutionProvider"]).get_inputs()[0].shape
    shape = [a.batch] + [int(d) for d in so[1:]]
    py, sh = [], []
    for _ in range(a.rounds):
        py.append(python_round(a.model, shape, a.threads, a.warmup, a.iterations))
        sh.append(shrink_round(a.shrink, a.model, a.threads, a.warmup, a.iterations, a.batch))
    r = {"model": a.model, "threads": a.threads, "batch": a.batch, "iterations": a.iterations,
         "python_p50_ms": py, "shrink_p50_ms": sh,
         "python_median_ms": statistics.median(py), "shrink_median_ms": statistics.median(sh)}
    r["ratio_shrink_over_python"] = r["shrink_median_ms"] / r["python_median_ms"]
    print(json.dumps(r))


if __name__ == "__main__":
    main()
