#!/usr/bin/env bash
# The GPU checks in one call, for a lent GPU machine whose image has torch and triton but not
# torchao / diffusers (carried as wheels in .whl/, see docs/gpu.md):
#   1. tests/test_cuda.py: the Triton kernels (autotuned and 16-blocks) against the integer-exact
#      reference at UNet shapes; the lowered graph, eager and torch.compile, against fake-quant
#   2. tools/kernel_bench.py: the kernels alone vs cuDNN / cuBLAS bf16 and cuBLAS int8
#   3. tools/bench.py: the whole step (DDPM CIFAR-10 UNet + sampler) per config, side by side
# Every stage has its own time limit and writes its results as it goes, under $OUT (default
# runs/gpu); a stage that fails does not stop the next.  Usage:  bash tools/gpu_check.sh
set -u
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCHAO_FORCE_SKIP_LOADING_SO_FILES=1
LOG="$OUT/run.log"
T_TEST=${T_TEST:-130} T_KERNEL=${T_KERNEL:-110} T_BENCH=${T_BENCH:-270}
BATCHES=${BATCHES:-64,256}

{
  date -u; nvidia-smi -L; nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} 2>&1 | tee "$LOG"

if [ -d .whl ]; then   # torchao, diffusers and what they need, where the image lacks them
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . 2>&1 | tail -3 | tee -a "$LOG"
if ! python3 -c "import ptq4dm.passes" 2>/dev/null; then   # no editable install: the package layout by links
  echo "editable install failed; importing ptq4dm through links in /tmp/ptq4dm_pkg" | tee -a "$LOG"
  mkdir -p /tmp/ptq4dm_pkg/ptq4dm
  for f in ptq4dm/*.py; do ln -sf "$PWD/$f" /tmp/ptq4dm_pkg/ptq4dm/; done
  for d in ir passes backends models; do ln -sfn "$PWD/$d" "/tmp/ptq4dm_pkg/ptq4dm/$d"; done
  export PYTHONPATH=/tmp/ptq4dm_pkg${PYTHONPATH:+:$PYTHONPATH}
  PYTEST_DIR=/tmp   # run pytest from outside the checkout, whose ptq4dm/ (the facade alone) would shadow the links
fi
python3 -c "import ptq4dm, diffusers, torchao; print('ptq4dm', ptq4dm.__version__, 'diffusers', diffusers.__version__, 'torchao', torchao.__version__)" 2>&1 | tee -a "$LOG"

stage() {   # stage NAME SECONDS CMD...
  local name=$1 secs=$2; shift 2
  echo "== $name (limit ${secs}s): $*" | tee -a "$LOG"
  local t0=$SECONDS
  timeout "$secs" "$@" >>"$LOG" 2>&1
  echo "== $name: rc $? in $((SECONDS - t0))s" | tee -a "$LOG"
}

REPO=$PWD
stage test_cuda "$T_TEST" bash -c "cd ${PYTEST_DIR:-$REPO} && python3 -m pytest -q -p no:cacheprovider $REPO/tests/test_cuda.py -x -rs"
stage kernel_bench "$T_KERNEL" python3 tools/kernel_bench.py --batches "$BATCHES" --out-json "$OUT/kernels.json"
stage bench "$T_BENCH" python3 tools/bench.py --models ddpm-cifar10 --batches "$BATCHES" \
  --configs fp32-eager,bf16-eager,bf16-compile,torchao-int8dyn-compile,ptq4dm-w8a8 \
  --warmup 3 --iters 10 --rounds 3 --chain 0 --profile --out-json "$OUT/bench-gpu.json"

grep -E "^== |passed|failed|error" "$LOG" | tail -20
cat "$OUT/kernels.md" "$OUT/bench-gpu.md" 2>/dev/null
