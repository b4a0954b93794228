#!/bin/bash
# Issue 27's measurement: the same calibration (N = 256) + evaluation (N = 500) job on 1 rank and
# on 2 ranks (gloo), 1 thread each, fresh calibration caches; wall time of each and the ratio.
#   bash docs/results/distributed/measure.sh  -> docs/results/distributed/wall.json
set -euo pipefail
cd "$(dirname "$0")/../../.."
export TORCHAO_FORCE_SKIP_LOADING_SO_FILES=1 OMP_NUM_THREADS=1
PY=${PY:-.venv/bin/python}
W=$(mktemp -d)
JOB=(--sampler ddim --steps 20 --samples 500 --batch 250 --calib-n 256 --threads 1 --configs fp,recommended)
t0=$(date +%s.%N)
$PY tools/evaluate.py "${JOB[@]}" --cache-dir "$W/c1" --out-json "$W/one.json" --out-md "$W/one.md" --grid "$W/one.png"
t1=$(date +%s.%N)
$PY -m torch.distributed.run --nproc-per-node 2 tools/evaluate.py "${JOB[@]}" --cache-dir "$W/c2" \
    --out-json "$W/two.json" --out-md "$W/two.md" --grid "$W/two.png"
t2=$(date +%s.%N)
$PY - "$W" "$t0" "$t1" "$t2" <<'PY'
import json, sys, platform, datetime, torch
w, t0, t1, t2 = sys.argv[1], *map(float, sys.argv[2:])
one, two = (json.load(open(f"{w}/{n}.json")) for n in ("one", "two"))
fids = [(a["config"], a["fid"], b["fid"]) for a, b in zip(one["rows"], two["rows"])]
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.machine())
rec = {"date": datetime.date.today().isoformat(), "cpu": cpu, "torch": torch.__version__,
       "job": "tools/evaluate.py --sampler ddim --steps 20 --samples 500 --batch 250 --calib-n 256 --threads 1 --configs fp,recommended",
       "one_rank_s": t1 - t0, "two_ranks_s": t2 - t1, "ratio": (t2 - t1) / (t1 - t0),
       "fid_one_vs_two": fids, "fid_equal": all(a == b for _, a, b in fids)}
json.dump(rec, open("docs/results/distributed/wall.json.tmp", "w"), indent=1)
import os; os.replace("docs/results/distributed/wall.json.tmp", "docs/results/distributed/wall.json")
print(json.dumps(rec, indent=1))
PY
