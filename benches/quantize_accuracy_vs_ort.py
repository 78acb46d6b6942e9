#!/usr/bin/env python3
"""Accuracy lost to int8 quantization: `shrink quantize` against ONNX Runtime's
`quantize_static`, on the same calibration samples, every model evaluated with ONNX Runtime.

    python3 benches/quantize_accuracy_vs_ort.py --shrink target/release/shrink \\
        --models fixtures/teacher.onnx fixtures/teacher_wide.onnx fixtures/student_folded.onnx

ONNX Runtime, as its documentation recommends: `quant_pre_process` (shape inference, graph
optimisation: BatchNorm folded), then `quantize_static` with per-channel int8 weights, uint8
activations, QDQ, MinMax (its default) and Entropy, calibrated on exactly the `--samples`
samples shrink drew with the same `--seed` (read from shrink's report). shrink: its
defaults (method auto, bias correction).

Per model and tool: top-1 on `--eval` and its drop from float, top-1 agreement with the
float model (share of samples whose predicted class is unchanged, finer than accuracy when
both lose little), and SQNR of the logits against the float logits in dB.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "fixtures"))
from ort_quantize import Reader, load_x  # noqa: E402  (the same data loading as there)


def logits(model, x):
    s = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    name = s.get_inputs()[0].name
    return np.concatenate([s.run(None, {name: x[i:i + 256]})[0] for i in range(0, len(x), 256)])


def sqnr_db(ref, approx):
    noise = np.sum((ref.astype(np.float64) - approx) ** 2)
    return float("inf") if noise == 0 else float(10 * np.log10(np.sum(ref.astype(np.float64) ** 2) / noise))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shrink", default="target/release/shrink")
    ap.add_argument("--models", nargs="+", required=True)
    ap.add_argument("--calib", default="fixtures/digits_train.npz")
    ap.add_argument("--eval", default="fixtures/digits_val.npz")
    ap.add_argument("--samples", type=int, default=300)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--json")
    a = ap.parse_args()

    cx, _ = load_x(a.calib)
    ex, ey = load_x(a.eval)
    work = Path(tempfile.mkdtemp(prefix="qacc-"))
    rows = []
    for model in a.models:
        stem = Path(model).stem
        f = logits(model, ex)
        f_top1 = float((f.argmax(1) == ey).mean())
        for seed in a.seeds:
            out = work / f"{stem}_s{seed}_shrink.onnx"
            rep = work / f"{stem}_s{seed}_shrink.json"
            subprocess.run([a.shrink, "quantize", model, "--calib", a.calib, "--calib-samples",
                            str(a.samples), "--seed", str(seed), "--out", str(out),
                            "--report", str(rep), "--quiet"], check=True,
                           stdout=subprocess.DEVNULL)
            # The same calibration digits as shrink: its seeded draw of sorted indices.
            calib = cx[np.asarray(json.loads(rep.read_text())["calib_indices"])]
            name = ort.InferenceSession(model, providers=["CPUExecutionProvider"]).get_inputs()[0].name
            tools = {"shrink (auto, bias correction)": out}
            pre = work / f"{stem}_pre.onnx"
            if not pre.exists():
                quant_pre_process(model, str(pre))
            for label, method in [("ort MinMax", CalibrationMethod.MinMax),
                                  ("ort Entropy", CalibrationMethod.Entropy)]:
                o = work / f"{stem}_s{seed}_{method.name}.onnx"
                quantize_static(str(pre), str(o), Reader(calib, name), quant_format=QuantFormat.QDQ,
                                per_channel=True, activation_type=QuantType.QUInt8,
                                weight_type=QuantType.QInt8, calibrate_method=method)
                tools[label] = o
            for label, path in tools.items():
                q = logits(str(path), ex)
                rows.append({
                    "model": stem, "seed": seed, "tool": label,
                    "size_ratio": os.path.getsize(path) / os.path.getsize(model),
                    "top1_float": f_top1,
                    "top1": float((q.argmax(1) == ey).mean()),
                    "drop_pts": (f_top1 - float((q.argmax(1) == ey).mean())) * 100,
                    "agreement": float((q.argmax(1) == f.argmax(1)).mean()),
                    "sqnr_db": sqnr_db(f, q),
                })
                r = rows[-1]
                print(f"{stem} seed {seed} {label}: top-1 {r['top1']*100:.2f} "
                      f"(float {f_top1*100:.2f}), agreement {r['agreement']*100:.2f}%, "
                      f"SQNR {r['sqnr_db']:.1f} dB", file=sys.stderr)

    print(f"\n{len(ey)} evaluation samples, {a.samples} calibration samples, seeds {a.seeds}; "
          "means over seeds\n")
    print("| model | tool | size ratio | top-1 drop (pts) | agreement with float | logit SQNR dB |")
    print("|---|---|---:|---:|---:|---:|")
    keys = sorted({(r["model"], r["tool"]) for r in rows}, key=lambda k: (a.models and k[0], k[1]))
    for m, t in keys:
        rs = [r for r in rows if r["model"] == m and r["tool"] == t]
        mean = lambda k: float(np.mean([r[k] for r in rs]))
        print(f"| {m} | {t} | {mean('size_ratio'):.3f} | {mean('drop_pts'):+.2f} | "
              f"{mean('agreement')*100:.2f}% | {mean('sqnr_db'):.1f} |")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
