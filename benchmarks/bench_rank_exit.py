"""How often a finished 2-rank run's process fails to exit cleanly: the test suite's 2-rank PPO launch, repeated.

    .venv/bin/python benchmarks/bench_rank_exit.py --runs 120             # this checkout
    .venv/bin/python benchmarks/bench_rank_exit.py --runs 70 --busy 2     # beside two busy CPU loops
    .venv/bin/python benchmarks/bench_rank_exit.py --code OTHER_CHECKOUT  # the ranks import tinyrl from there

Each launch is `tests/test_distributed.py`'s own (`torchrun --nproc_per_node=2 -m tinyrl.train` on the tiny model,
PPO, 6 steps). A launch counts as aborted when torchrun exits non-zero although the run wrote `summary.json`:
the work was done and the process failed on its way out (see `tinyrl.distributed.end_rank_process`). Such exits
are rare and depend on load, so the figure is a rate over many launches, not a timing.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1] / "tests"
sys.path.insert(0, str(TESTS))

from conftest import TINY_TEXTS  # noqa: E402
from test_distributed import _env, _overrides, TORCHRUN  # noqa: E402

from tinyrl.models import build_tiny_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--busy", type=int, default=0, help="busy CPU loops to run beside the launches")
    parser.add_argument("--code", default=None, help="a checkout whose tinyrl the ranks import (default: this one)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench_rank_exit-"))
    model = build_tiny_model(root / "model", TINY_TEXTS, vocab_size=320, hidden_size=64, num_heads=2,
                             num_kv_heads=1, intermediate_size=128, num_layers=2, seed=0)
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
    aborted, failed, seconds = [], [], []
    try:
        for i in range(args.runs):
            run_dir = root / f"run{i}"
            started = time.perf_counter()
            done = subprocess.run([*TORCHRUN, "-m", "tinyrl.train", *_overrides(model, run_dir, "algorithm=ppo")],
                                  env=_env(), cwd=args.code, capture_output=True, text=True, timeout=600)
            seconds.append(time.perf_counter() - started)
            if done.returncode:
                (aborted if (run_dir / "summary.json").exists() else failed).append(i)
                (root / f"run{i}.stderr").write_text(done.stderr)
            print(f"launch {i}: exit {done.returncode}, {seconds[-1]:.1f} s", flush=True)
    finally:
        for process in busy:
            process.kill()
    code = args.code or "this checkout"
    print(f"\n{len(aborted)} of {args.runs} finished runs aborted on exit ({code}, {args.busy} busy loops beside; "
          f"median launch {sorted(seconds)[len(seconds) // 2]:.1f} s)")
    if failed:
        print(f"{len(failed)} launches failed before finishing: see {root}/run*.stderr")
    if aborted:
        print(f"stderr of the aborted launches: {root}/run*.stderr")


if __name__ == "__main__":
    main()
