#!/bin/bash
# Issue 27's measurement: the same calibration (N = 256) + evaluation (N = 500) job on 1 rank and
# on 2 ranks (gloo), 1 thread each, fresh calibration caches; wall time of each and the ratio.
# REPEATS pairs (default 3) run interleaved (1 rank, 2 ranks, 1 rank, ...) so that a slow spell of
# the machine hits both sides; every pair's ratio is recorded, and the ratio of the medians.
#   bash docs/results/distributed/measure.sh [out.json]  -> docs/results/distributed/wall.json
# Run it with nothing else on the machine: it measures wall time.
set -euo pipefail
cd "$(dirname "$0")/../../.."
export TORCHAO_FORCE_SKIP_LOADING_SO_FILES=1 OMP_NUM_THREADS=1
PY=${PY:-.venv/bin/python}
OUTF=${1:-docs/results/distributed/wall.json}
REPEATS=${REPEATS:-3}
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
JOB=(--sampler ddim --steps 20 --samples 500 --batch 250 --calib-n 256 --threads 1 --configs fp,recommended)
: > "$W/times"
for r in $(seq 1 "$REPEATS"); do
    t0=$(date +%s.%N)
    $PY tools/evaluate.py "${JOB[@]}" --cache-dir "$W/c1-$r" --out-json "$W/one-$r.json" --out-md "$W/one.md" \
        --grid "$W/one.png" > "$W/one-$r.log" 2>&1
    t1=$(date +%s.%N)
    $PY -m torch.distributed.run --nproc-per-node 2 tools/evaluate.py "${JOB[@]}" --cache-dir "$W/c2-$r" \
        --out-json "$W/two-$r.json" --out-md "$W/two.md" --grid "$W/two.png" > "$W/two-$r.log" 2>&1
    t2=$(date +%s.%N)
    echo "$r $t0 $t1 $t2" >> "$W/times"
    echo "pair $r: 1 rank $(echo "$t1 - $t0" | bc) s, 2 ranks $(echo "$t2 - $t1" | bc) s"
done
$PY - "$W" "$OUTF" <<'PY'
import datetime, json, os, platform, statistics, sys

import torch

w, outf = sys.argv[1], sys.argv[2]
pairs = []
for line in open(f"{w}/times"):
    r, t0, t1, t2 = line.split()
    one, two = (json.load(open(f"{w}/{n}-{r}.json")) for n in ("one", "two"))
    fids = [(a["config"], a["fid"], b["fid"]) for a, b in zip(one["rows"], two["rows"])]
    t0, t1, t2 = map(float, (t0, t1, t2))
    pairs.append({"one_rank_s": t1 - t0, "two_ranks_s": t2 - t1, "ratio": (t2 - t1) / (t1 - t0),
                  "fid_one_vs_two": fids, "fid_equal": all(a == b for _, a, b in fids)})
one = statistics.median(p["one_rank_s"] for p in pairs)
two = statistics.median(p["two_ranks_s"] for p in pairs)
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.machine())
rec = {"date": datetime.date.today().isoformat(), "cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
       "job": "tools/evaluate.py --sampler ddim --steps 20 --samples 500 --batch 250 --calib-n 256 --threads 1 --configs fp,recommended",
       "command": "bash docs/results/distributed/measure.sh", "pairs": pairs,
       "one_rank_median_s": one, "two_ranks_median_s": two, "ratio_of_medians": two / one,
       "ratio_worst_pair": max(p["ratio"] for p in pairs), "fid_equal_every_pair": all(p["fid_equal"] for p in pairs)}
tmp = outf + ".tmp"
json.dump(rec, open(tmp, "w"), indent=1)
os.replace(tmp, outf)
print(json.dumps({k: v for k, v in rec.items() if k != "pairs"}, indent=1))
PY
