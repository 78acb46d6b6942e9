"""Runs onnx.checker with full_check (type and shape inference included) on each model given,
for the tests of models shrink writes:

    python3 scripts/check_onnx.py a.onnx b.onnx

Prints one line per model and exits with status 1 at the first model the checker refuses.
Needs the `onnx` package (`pip install onnx==1.23.2`; scripts/test installs it).
"""
import sys

import onnx


def main():
    for path in sys.argv[1:]:
        try:
            onnx.checker.check_model(onnx.load(path), full_check=True)
        except Exception as e:  # the checker raises several exception types
            print(f"{path}: {e}")
            sys.exit(1)
        print(f"{path}: ok")


if __name__ == "__main__":
    main()
