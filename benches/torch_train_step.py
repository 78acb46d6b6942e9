#!/usr/bin/env python3
"""PyTorch baseline for benches/train_step.rs: one SGD training step (forward in
training mode, mean cross-entropy, backward, SGD update with lr 0.01) on the same
architectures and weights as the fixtures:

- student: fixtures/student_init.pt (the network of fixtures/student.onnx), batch 64, 1x28x28;
- mbv2_tiny: fixtures/mbv2_tiny_init.pt (fixtures/mbv2_tiny.onnx), batch 32, 3x32x32.

Run from the repository root:

    python3 benches/torch_train_step.py [--steps 200]

For each model and thread count (torch.set_num_threads(1), then 2) it runs 20
warm-up steps, times `--steps` steps and prints the median step time and
samples/s.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


def fixture_module():
    spec = importlib.util.spec_from_file_location("make_fixtures", FIXTURES / "make_fixtures.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=200)
    args = ap.parse_args()
    mf = fixture_module()
    print(f"torch {torch.__version__}")
    for name, cls, weights, shape in [
        ("student", mf.Student, "student_init.pt", (64, 1, 28, 28)),
        ("mbv2_tiny", mf.MobileNetV2Tiny, "mbv2_tiny_init.pt", (32, 3, 32, 32)),
    ]:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            torch.manual_seed(0)
            model = cls()
            model.load_state_dict(torch.load(FIXTURES / weights))
            model.train()
            opt = torch.optim.SGD(model.parameters(), lr=0.01)
            x = torch.rand(shape)
            y = torch.randint(0, 10, (shape[0],))

            def step():
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(model(x), y).backward()
                opt.step()

            for _ in range(20):
                step()
            times = []
            for _ in range(args.steps):
                t = time.perf_counter()
                step()
                times.append(time.perf_counter() - t)
            med = statistics.median(times)
            print(f"{name:10s} threads={threads}: {med * 1e3:7.2f} ms/step  {shape[0] / med:8.0f} samples/s")


if __name__ == "__main__":
    main()
