#!/usr/bin/env bash
# Every GPU check in one go, in under 8 minutes on one H200:
#
#   scripts/gpu_check.sh                # from anywhere; runs in the repo root
#   PYTHON=/opt/venv/bin/python scripts/gpu_check.sh
#
# Needs a CUDA build of torch in the active Python environment, or in .venv (set
# PYTHON to choose another). Steps, each under `timeout` and all together under
# GPU_CHECK_BUDGET_S (default 450 s):
#
#   1. environment: nvidia-smi, torch / CUDA versions  -> benchmarks/results/gpu-check.txt
#   2. pytest -m cuda -q -rA                           -> benchmarks/results/gpu-pytest.txt
#   3. benchmarks/gpu_offload.py, short setting        -> benchmarks/results/gpu_offload.{json,md}
#   4. benchmarks/memory.py --model 1b --device cuda   -> benchmarks/results/memory-1b-cuda.{json,md}
#   5. benchmarks/packing.py --device cuda (bf16)      -> benchmarks/results/packing-cuda.{json,md}
#   6. benchmarks/plan_accuracy.py --device cuda       -> benchmarks/results/plan_accuracy-cuda.{json,md}
#   7. benchmarks/tiered.py --device cuda (1.2B)       -> benchmarks/results/tiered-cuda.{json,md}
#   8. benchmarks/compact_states.py library --device cuda -> benchmarks/results/compact-library-cuda.{json,md}
#   9. sharded training on one GPU (FSDP2 over NCCL, a mesh of one process, under
#      torchrun), GRASS on SmolLM2-135M, then with distributed.cpu_offload and its
#      grass plan                                      -> benchmarks/results/fsdp-cuda.txt
#
# A failing or timed-out step does not stop the later ones: each step's exit status
# (124: timed out) is written to gpu-check.txt, with a summary at the end, and the
# script exits non-zero if any step failed. Without CUDA everything degrades to
# skips: the cuda tests skip, gpu_offload.py says so and exits 0, and steps 4-9
# are not run (they would measure the CPU, or fail).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [[ -n "${PYTHON:-}" ]]; then
    PY=$PYTHON
elif [[ -n "${VIRTUAL_ENV:-}" ]] || [[ ! -x .venv/bin/python ]]; then
    PY=$(command -v python || command -v python3)
else
    PY=.venv/bin/python
fi

RESULTS=benchmarks/results
LOG=$RESULTS/gpu-check.txt
BUDGET=${GPU_CHECK_BUDGET_S:-450}
mkdir -p "$RESULTS"
: >"$LOG"
START=$SECONDS
export PYTHONUNBUFFERED=1  # live output through tee
STATUS=()
FAILED=0

log() { echo "$*" | tee -a "$LOG"; }

# step NAME SECONDS OUTFILE CMD...: run CMD under `timeout` (capped by what is left
# of the budget), its output to the terminal and appended to OUTFILE, its exit status
# recorded; never aborts the script.
step() {
    local name=$1 limit=$2 out=$3
    shift 3
    local left=$((BUDGET - (SECONDS - START)))
    if ((left < 15)); then
        log "== $name: not run (the ${BUDGET} s budget is spent)"
        STATUS+=("$name: not run (no time left)")
        FAILED=1
        return
    fi
    if ((limit > left)); then
        limit=$left
    fi
    local cmd="$*"
    [[ $cmd == *$'\n'* ]] && cmd="${cmd%%$'\n'*} ..."  # a multi-line script: its first line
    log "== $name (timeout ${limit} s): $cmd"
    local t0=$SECONDS rc=0
    set +e
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$out"
    rc=${PIPESTATUS[0]}
    set -e
    local why=""
    if ((rc == 124 || rc == 137)); then
        why=" (timed out)"
    fi
    log "== $name: exit $rc$why after $((SECONDS - t0)) s"
    STATUS+=("$name: exit $rc$why")
    if ((rc != 0)); then
        FAILED=1
    fi
}

log "# GPU check $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname)"
if REV=$(git rev-parse --short HEAD 2>/dev/null); then
    git diff --quiet HEAD 2>/dev/null || REV="$REV (with uncommitted changes)"
    log "# git $REV"
fi
log "# python: $PY"

# 1) environment
if command -v nvidia-smi >/dev/null; then
    step nvidia-smi 20 "$LOG" nvidia-smi
else
    log "== nvidia-smi: not found (no NVIDIA driver here)"
    STATUS+=("nvidia-smi: not found")
fi
step versions 60 "$LOG" "$PY" -c '
import sys, torch
print("python", sys.version.split()[0])
print("torch", torch.__version__, "| CUDA build", torch.version.cuda,
      "| cuDNN", torch.backends.cudnn.version())
print("cuda available:", torch.cuda.is_available())
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"  cuda:{i} {p.name}, {p.total_memory / 2**30:.1f} GiB, sm_{p.major}{p.minor}")
'

HAVE_CUDA=0
if "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    HAVE_CUDA=1
else
    log "# no CUDA device visible to torch: the cuda tests skip, the CUDA benchmarks are not run"
fi

# 2) the CUDA tests (they skip without CUDA)
: >"$RESULTS/gpu-pytest.txt"
# -rA: the captured output of passed tests too (the plan test prints its numbers)
step "pytest -m cuda" 150 "$RESULTS/gpu-pytest.txt" "$PY" -m pytest -m cuda -q -rA

# 3) keep vs offload, overlap on/off: a short setting (5 trainings in child processes)
step gpu_offload 150 "$LOG" "$PY" benchmarks/gpu_offload.py \
    --steps 12 --switch-interval 3 --micro-batch 8 --max-length 256

# 4) the memory benchmark on the ~1.2B bf16 model (full, LoRA, LISA-keep, GRASS-offload)
if ((!HAVE_CUDA)); then
    log "== memory --model 1b: skipped (no CUDA)"
    STATUS+=("memory --model 1b: skipped (no CUDA)")
else
    step "memory --model 1b" 120 "$LOG" "$PY" benchmarks/memory.py --model 1b --device cuda
fi

# 5) sample packing's tokens/s, off against on, SmolLM2-135M bf16: two settings, one round
if ((!HAVE_CUDA)); then
    log "== packing: skipped (no CUDA)"
    STATUS+=("packing: skipped (no CUDA)")
else
    step packing 100 "$LOG" "$PY" benchmarks/packing.py --device cuda --dtype bfloat16 \
        --steps 20 --rounds 1 --scenarios quickstart-mb8 mixture-mb4 \
        --out "$RESULTS/packing-cuda.json"
fi

# 6) grass plan's predictions against measured peaks (135M and 1.2B)
if ((!HAVE_CUDA)); then
    log "== plan_accuracy: skipped (no CUDA)"
    STATUS+=("plan_accuracy: skipped (no CUDA)")
else
    step plan_accuracy 180 "$LOG" "$PY" benchmarks/plan_accuracy.py --device cuda
fi

# 7) the two-tier state store on CUDA at 1.2B: pinned budget, disk spill, overlap on/off
if ((!HAVE_CUDA)); then
    log "== tiered: skipped (no CUDA)"
    STATUS+=("tiered: skipped (no CUDA)")
else
    step tiered 120 "$LOG" "$PY" benchmarks/tiered.py --device cuda --steps 12 --host-budget 2
fi

# 8) compact optimizer states on CUDA: fp32 / bf16 / bitsandbytes 8-bit AdamW steps
if ((!HAVE_CUDA)); then
    log "== compact library: skipped (no CUDA)"
    STATUS+=("compact library: skipped (no CUDA)")
else
    step "compact library" 45 "$LOG" "$PY" benchmarks/compact_states.py library --device cuda
fi

# 9) the sharded (FSDP2) code path on CUDA: NCCL, bf16 compute, fp32 reduction
if ((!HAVE_CUDA)); then
    log "== fsdp: skipped (no CUDA)"
    STATUS+=("fsdp: skipped (no CUDA)")
else
    : >"$RESULTS/fsdp-cuda.txt"
    step fsdp 90 "$RESULTS/fsdp-cuda.txt" "$PY" -m torch.distributed.run --standalone \
        --nproc-per-node 1 -m grass_cli train recipes/quickstart.yaml --no-live --overwrite \
        distributed.sharding=fsdp training.device=cuda training.max_steps=20 \
        output.dir="${TMPDIR:-/tmp}/grass-gpu-check-fsdp"
    # distributed.cpu_offload: pinned shards, AdamW on the host, gloo beside NCCL;
    # the run's CUDA peak (its step lines) against grass plan's for the same recipe
    step "fsdp cpu_offload" 120 "$RESULTS/fsdp-cuda.txt" "$PY" -m torch.distributed.run \
        --standalone --nproc-per-node 1 -m grass_cli train recipes/quickstart.yaml --no-live \
        --overwrite distributed.sharding=fsdp distributed.cpu_offload=true \
        training.device=cuda training.max_steps=20 \
        output.dir="${TMPDIR:-/tmp}/grass-gpu-check-fsdp-offload"
    step "fsdp cpu_offload plan" 60 "$RESULTS/fsdp-cuda.txt" "$PY" -m grass_cli plan \
        recipes/quickstart.yaml --nproc 1 distributed.sharding=fsdp \
        distributed.cpu_offload=true --json
fi

log ""
log "# summary ($((SECONDS - START)) s of ${BUDGET} s)"
for s in "${STATUS[@]}"; do
    log "  $s"
done
exit "$FAILED"
