#!/usr/bin/env python3
"""Wall time and peak memory of `shrink quantize` against ONNX Runtime's `quantize_static`,
measured side by side in one run (alternating rounds), each tool in a process of its own.

    python3 fixtures/export_torchvision.py /tmp/shrink-models           # resnet18.onnx
    python3 benches/quantize_vs_ort.py --model /tmp/shrink-models/resnet18.onnx \\
        --shrink target/release/shrink --samples 300 --rounds 2 --json /tmp/qbench.json

The calibration set is `--samples` seeded random smooth images (float32 NCHW in [0, 1], the
model's input size), written once to `--images` (default /tmp/qbench_images_N.npz); both
tools quantize from that file with per-channel int8 weights, uint8 activations, QDQ output.
ONNX Runtime runs `quantize_static` with MinMax (one calibration pass); shrink runs
`--method minmax` (the same statistics) without and with bias correction (on by default; a
second pass over the data with quantized weights), and its default `--method auto`,
calibrating on ONNX Runtime (`--calib-backend ort`) and on tract (the default).

Wall time is the whole process, start to exit (loading the data included, as a user waits
for it); peak memory is the process's maximum resident set (`ru_maxrss` from wait4). Every
process gets the same thread count (`--threads`, default all cores).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ORT_WORKER = r"""
import sys, time
import numpy as np
import onnxruntime as ort
from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat,
                                      QuantType, quantize_static)
model, images, out, threads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
x = np.load(images)["x"]
name = ort.InferenceSession(model, providers=["CPUExecutionProvider"]).get_inputs()[0].name

class Reader(CalibrationDataReader):
    # Equal batches of 30 (300 = 10 x 30): ORT's histogram calibrators need equal batches,
    # MinMax does not care; kept the same for every method.
    def __init__(self):
        b = max(d for d in range(1, 33) if len(x) % d == 0)
        self.it = iter([{name: x[i:i + b]} for i in range(0, len(x), b)])
    def get_next(self):
        return next(self.it, None)

quantize_static(model, out, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
                extra_options={"IntraOpNumThreads": threads} if threads else {})
"""


def smooth_images(n, c, h, w, seed):
    """Random images with image-like spatial correlation: 8x8 noise upsampled bilinearly,
    plus fine noise, clipped to [0, 1]."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((n, c, 8, 8), dtype=np.float32)
    yi = np.linspace(0, 7, h, dtype=np.float32)
    xi = np.linspace(0, 7, w, dtype=np.float32)
    y0, x0 = np.floor(yi).astype(int), np.floor(xi).astype(int)
    y1, x1 = np.minimum(y0 + 1, 7), np.minimum(x0 + 1, 7)
    fy, fx = (yi - y0)[:, None], (xi - x0)[None, :]
    out = np.empty((n, c, h, w), dtype=np.float32)
    for i in range(n):
        g = coarse[i]
        top = g[:, y0][:, :, x0] * (1 - fx) + g[:, y0][:, :, x1] * fx
        bot = g[:, y1][:, :, x0] * (1 - fx) + g[:, y1][:, :, x1] * fx
        out[i] = top * (1 - fy) + bot * fy
    out += rng.normal(0, 0.03, out.shape).astype(np.float32)
    return np.clip(out, 0, 1)


def input_shape(model):
    import onnxruntime as ort
    s = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    shape = s.get_inputs()[0].shape
    return [int(d) for d in shape[1:]]


def measure(cmd, env=None):
    t = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    stderr = p.stderr.read()
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        sys.exit(f"{' '.join(cmd)} failed ({code}):\n{stderr.decode(errors='replace')[-3000:]}")
    return wall, usage.ru_maxrss * 1024


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--shrink", default="target/release/shrink")
    ap.add_argument("--samples", type=int, default=300)
    ap.add_argument("--images")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json")
    a = ap.parse_args()

    images = a.images or f"/tmp/qbench_images_{a.samples}.npz"
    if not Path(images).exists():
        c, h, w = input_shape(a.model)
        print(f"writing {a.samples} calibration images {c}x{h}x{w} to {images}", file=sys.stderr)
        np.savez(images, x=smooth_images(a.samples, c, h, w, a.seed))

    import onnxruntime as ort
    work = tempfile.mkdtemp(prefix="qbench-")
    shrink_common = [a.shrink, "quantize", a.model, "--calib", images, "--calib-samples",
                     str(a.samples), "--threads", str(a.threads), "--quiet"]
    tools = {
        "ort quantize_static minmax": [sys.executable, "-c", ORT_WORKER, a.model, images,
                                       f"{work}/ort.onnx", str(a.threads)],
        "shrink minmax, no bias correction (ort calib)": shrink_common + [
            "--method", "minmax", "--no-bias-correction", "--calib-backend", "ort",
            "--out", f"{work}/s_mm_nobc_ort.onnx"],
        "shrink minmax (ort calib)": shrink_common + ["--method", "minmax", "--calib-backend",
                                                      "ort", "--out", f"{work}/s_mm_ort.onnx"],
        "shrink minmax (tract calib)": shrink_common + ["--method", "minmax",
                                                        "--out", f"{work}/s_mm_tract.onnx"],
        "shrink auto (ort calib)": shrink_common + ["--calib-backend", "ort",
                                                    "--out", f"{work}/s_auto_ort.onnx"],
    }
    outs = {"ort quantize_static minmax": "ort.onnx",
            "shrink minmax, no bias correction (ort calib)": "s_mm_nobc_ort.onnx",
            "shrink minmax (ort calib)": "s_mm_ort.onnx",
            "shrink minmax (tract calib)": "s_mm_tract.onnx",
            "shrink auto (ort calib)": "s_auto_ort.onnx"}
    runs = {k: [] for k in tools}
    for r in range(a.rounds):
        for k, cmd in tools.items():
            wall, rss = measure(cmd)
            runs[k].append({"wall_s": round(wall, 2), "peak_rss_bytes": rss})
            print(f"round {r + 1} {k}: {wall:.1f} s, peak RSS {rss / 2**20:.0f} MiB",
                  file=sys.stderr)

    base = runs["ort quantize_static minmax"]
    med = lambda xs: float(np.median(xs))
    base_wall = med([x["wall_s"] for x in base])
    base_rss = med([x["peak_rss_bytes"] for x in base])
    size_before = os.path.getsize(a.model)
    result = {"model": a.model, "samples": a.samples, "threads": a.threads, "rounds": a.rounds,
              "ort_version": ort.__version__, "cpu_count": os.cpu_count(), "tools": {}}
    print(f"\n{a.model}, {a.samples} calibration samples, {a.threads} threads, "
          f"median of {a.rounds} alternating rounds\n")
    print("| tool | wall s | peak RSS MiB | wall vs ORT | peak RSS vs ORT | size ratio |")
    print("|---|---:|---:|---:|---:|---:|")
    for k, rs in runs.items():
        wall = med([x["wall_s"] for x in rs])
        rss = med([x["peak_rss_bytes"] for x in rs])
        ratio = os.path.getsize(f"{work}/{outs[k]}") / size_before
        result["tools"][k] = {"runs": rs, "median_wall_s": wall, "median_peak_rss_bytes": rss,
                              "wall_vs_ort": wall / base_wall, "rss_vs_ort": rss / base_rss,
                              "size_ratio": ratio}
        print(f"| {k} | {wall:.1f} | {rss / 2**20:.0f} | {wall / base_wall:.2f}x | "
              f"{rss / base_rss:.2f}x | {ratio:.3f} |")
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
