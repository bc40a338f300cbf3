#!/usr/bin/env bash
# A Hydra sweep: two algorithms x two seeds of the CPU default, each run in multirun/<time>/<job number>/ (its overrides in .hydra/overrides.yaml).
# Compare the runs' summary.json files (accuracy_before_rl, accuracy_after_rl) afterwards, e.g.
#   for f in multirun/*/*/summary.json; do echo "$f $(python -c "import json,sys; s=json.load(open('$f')); print(s['accuracy_before_rl'], s['accuracy_after_rl'])")"; done
set -euo pipefail
tinyrl-train -m algorithm=grpo,dr_grpo seed=0,1 "$@"
