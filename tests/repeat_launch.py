"""Repeat one 2-process launch of tests/test_distributed.py and count the runs that fail (not collected by pytest).

    HF_HUB_OFFLINE=1 taskset -c 0 .venv/bin/python tests/repeat_launch.py sft 3 40

For rare faults such as the exit-time abort under ZeRO-3 that the README describes; `taskset -c 0` puts both
ranks on one core, as on a loaded CI machine. A failed run's output is kept in `failed-N.log` under the work
directory (default: a temporary one).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]

from conftest import make_tiny_model  # noqa: E402
from test_distributed import run_launch  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=["sft", "reward"])
    parser.add_argument("zero", type=int, choices=[2, 3])
    parser.add_argument("runs", type=int)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    root = Path(args.workdir or tempfile.mkdtemp(prefix="repeat-launch-"))
    (root / "tiny").mkdir(parents=True, exist_ok=True)
    model = make_tiny_model(root / "tiny")  # the tests' `tiny_model_dir`
    failed = 0
    for i in range(args.runs):
        run = root / f"run{i}"
        started = time.time()
        done = run_launch(args.stage, args.zero, run, model)
        if done.returncode != 0:
            failed += 1
            (root / f"failed-{i}.log").write_text(done.stdout + done.stderr)
        print(f"run {i}: exit {done.returncode}, {time.time() - started:.1f} s", flush=True)
        shutil.rmtree(run, ignore_errors=True)
    print(f"{failed} of {args.runs} runs failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
