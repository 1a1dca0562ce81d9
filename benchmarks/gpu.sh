#!/usr/bin/env bash
# The whole GPU check of BENCHMARKS.md in one run, for a short loan of one GPU (about 8 minutes on an H200):
#   1. the CUDA tests (tests/test_gpu.py: no host sync in the flow's step, nor in `glow fit`'s quiet training
#      batches under torch.cuda.set_sync_debug_mode("error") (issue 17 item 2), compiled == eager, bf16 fit);
#   2. the paper config (L=3 K=32 width 512) in bf16-mixed: ours eager / compiled (CUDA graphs) / normflows;
#   3. the fit loop against the raw step at the paper config, and the end-of-epoch work's share of an epoch
#      (benchmarks/fitloop.py, issue 17 item 4);
#   4. the original notebook's three configurations at batch 64.
# Each part writes its output to $OUT (default benchmarks/results) as it goes, so a run cut short keeps
# what it measured. Wheels for packages the GPU machine lacks (normflows, jsonargparse and its needs) are
# installed from .whl/ when that folder exists; without normflows the benchmark runs ours alone.
#
# The wheels (pure Python; the GPU machine has Python 3.12, torch, lightning, torchmetrics, numpy):
#   pip download normflows==1.7.3 -d /tmp/sdist && pip wheel --no-deps -w .whl /tmp/sdist/normflows-1.7.3.tar.gz
#   pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl jsonargparse docstring-parser typeshed-client
# With the device tool: run(command="bash benchmarks/gpu.sh", carry=[".whl"], timeout_s=600).
#
#   bash benchmarks/gpu.sh            # then copy the tables into BENCHMARKS.md
#   DRY_RUN=1 bash benchmarks/gpu.sh  # on a CPU: print the commands, run none (checks the script and its caps)
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
if [ -n "${DRY_RUN:-}" ]; then  # print each command with its cap instead of running it
    timeout() { echo "[cap $1 s] ${*:2}"; }
    python3() { echo "python3 $*"; }
fi
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 WANDB_MODE=disabled
python3 - <<'EOF' 2>&1 | tee "$out/machine.txt"
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))
EOF
nflows=normflows
python3 -c "import normflows" 2>/dev/null || { nflows=""; echo "normflows missing: ours only" | tee -a "$out/machine.txt"; }

# One device call may run 600 s: every part gets its own cap, and none runs past BUDGET seconds in all
# (a part cut short prints no table, so the most important ones run first).
budget=${BUDGET:-560}
cap() { local left=$((budget - SECONDS)); echo $(( left < $1 ? (left > 0 ? left : 1) : $1 )); }
bench() { timeout "$(cap "$1")" python3 benchmarks/benchmark.py --device cuda --precision bf16-mixed "${@:2}"; }

timeout "$(cap 150)" python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tail -n 30 | tee "$out/tests.txt"
bench 200 --levels 3 --steps-per-level 32 --hidden-channels 512 --batch-size 256 --steps 20 --warmup 5 \
    --impl ours ours-compile $nflows --compile-mode reduce-overhead 2>&1 | tee "$out/paper_bf16.txt"
# issue 17 item 4: glow fit's training batches vs the raw step (paper config, bf16, cifar.yaml's callbacks and
# DataLoader workers), then the end-of-epoch work (grids, invertibility check) against 703 x the step
fit() { timeout "$(cap "$1")" python3 benchmarks/fitloop.py --device cuda --precision bf16-mixed --num-workers 4 "${@:2}"; }
fit 90 --part ratio --levels 3 --steps-per-level 32 --hidden-channels 512 --batch-size 64 --steps 40 --rounds 1 \
    --warmup 10 2>/dev/null | grep -v "it/s" | tee "$out/fitloop_ratio.txt"
fit 60 --part epoch-end --steps 5 2>/dev/null | grep -v "it/s" | tee "$out/fitloop_epoch_end.txt"
for lk in "3 32" "3 10" "2 10"; do  # the notebook's configurations at batch 64, its slowest first
    set -- $lk
    bench 90 --levels "$1" --steps-per-level "$2" --hidden-channels 512 --batch-size 64 --steps 20 --warmup 5 \
        --impl ours ours-compile --compile-mode reduce-overhead --no-flops 2>&1 | tee "$out/notebook_L$1_K$2.txt"
done
# issue 17 item 1: peak allocated memory of plain, recompute and invert at the paper config (the "peak MiB" column)
bench 90 --levels 3 --steps-per-level 32 --hidden-channels 512 --batch-size 64 --steps 5 --warmup 2 \
    --impl ours ours-memory ours-invert --no-flops 2>&1 | tee "$out/memory_paper.txt"
echo "gpu.sh done in ${SECONDS} s" | tee -a "$out/machine.txt"
