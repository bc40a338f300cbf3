#!/usr/bin/env bash
# A Hydra sweep: two algorithms x two seeds of the CPU default, each run in multirun/<time>/<job number>/ (its
# config in config.yaml, its figures in summary.json). Extra arguments are passed on, e.g.
#   examples/sweep.sh trainer.steps=20
# It runs the Python in $PYTHON, else the repository's .venv, else python3 (whichever has tinyrl installed); the
# venv need not be on PATH. Compare the runs afterwards, e.g.
#   for f in multirun/*/*/summary.json; do echo "$f $(.venv/bin/python -c "import json,sys; s=json.load(open('$f')); print(s['accuracy_before_rl'], s['accuracy_after_rl'])")"; done
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-}"
if [ -z "$python" ]; then
  if [ -x "$repo/.venv/bin/python" ]; then python="$repo/.venv/bin/python"; else python=python3; fi
fi
exec "$python" -m tinyrl.train -m algorithm=grpo,dr_grpo seed=0,1 "$@"
