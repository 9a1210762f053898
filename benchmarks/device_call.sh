#!/usr/bin/env bash
# Issue 2's speed acceptance in one device call: the four GPT-2 shapes at nanoGPT's batch sizes through the
# real trainer (benchmarks/train_mfu.py via mfu_variants.py: the jobs compile side by side, then each times
# alone), with a kernel table per shape, and what the machine is. Made for the `device` tool, where one
# command may run 600 s and at most 8 files come back:
#
#     bash benchmarks/device_call.sh            # (device tool, timeout_s 590) -> $OUT
#     TESTS=1 bash benchmarks/device_call.sh    # first the GPU-only tests (about a minute more)
#     OPTIM=1 bash benchmarks/device_call.sh default@gpt2-124m   # first the optimizer alone at 1.5B, with the
#                                               # sum of squares at 4, 8, 16 blocks a program (~2 minutes more)
#     LOSS=1 bash benchmarks/device_call.sh     # first the loss kernel alone against Inductor's, three tiles
#                                               # (benchmarks/loss_kernel.py at 124M's shape, ~1 minute more)
#     bash benchmarks/device_call.sh default gather@gpt2-1.5b   # other jobs (mfu_variants.py names)
#     ARGS="--device cpu --smoke --steps 2 --warmup 1" bash benchmarks/device_call.sh default@gpt2-124m  # CPU check
#
# The default jobs: the acceptance's three shapes, and 124M with the loss kernel (`lossk`, run.loss_kernel=auto:
# not yet timed; 350M, timed before and outside the acceptance, runs when named: default@gpt2-350m).
# With TESTS=1 LOSS=1 use LIMIT=180 (the tests and the loss benchmark take ~2 minutes before the waves).
# Waves are cut by the card's memory (mfu_variants.JOB_GIB; H100 80GB: 1.5B with 124M, then 774M with lossk 124M;
# H200: 1.5B, 124M and 774M, then lossk 124M), each under LIMIT seconds (default 250; with TESTS=1 take 210, so two
# waves and the tests fit 590 s). ARGS go on to train_mfu.py. Back in $OUT: mfu.jsonl (one row per finished
# shape), summary.txt (the machine, the tests, the table), profiles.tgz (kernel tables, gap summaries, logs).
# Record the figures in benchmarks/RESULTS.md with this command, the device and the date.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
mkdir -p "$OUT"
work=$(mktemp -d)
summary="$OUT/summary.txt"
# torch imported once (~3 s): its versions, then the GPU memory the jobs of one wave may hold together (the
# card's, less ~4 GiB for contexts and fragmentation; 0 without a GPU)
info=$(python3 -c "import torch
try:
    import triton; tv = triton.__version__
except ImportError:
    tv = None
c = torch.cuda.is_available()
print('torch', torch.__version__, 'triton', tv)
print(int(torch.cuda.get_device_properties(0).total_memory / 2**30) - 4 if c else 0)" 2>&1)
mem=${info##*$'\n'}
{
  date -u +"%Y-%m-%d %H:%M UTC"
  echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo '(not a git checkout)')," \
    "$(git status --short 2>/dev/null | wc -l) paths changed since"
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv,noheader 2>&1
  echo "${info%$'\n'*}"
} > "$summary"
cat "$summary"
if [ "${TESTS:-0}" = 1 ]; then
  python3 -m pytest -q tests/test_kernels.py tests/train/test_cuda_paths.py 2>&1 | tail -15 | tee -a "$summary"
fi
if [ "${OPTIM:-0}" = 1 ]; then
  # shellcheck disable=SC2086
  timeout 200 python3 benchmarks/optim_step.py ${OPTIM_ARGS:---steps 10 --tiles 1024x4x4 1024x4x8 1024x4x16} \
    2>&1 >"$OUT/optim.jsonl" | tee -a "$summary"
fi
if [ "${LOSS:-0}" = 1 ]; then
  # shellcheck disable=SC2086
  timeout 150 python3 benchmarks/loss_kernel.py ${LOSS_ARGS:---tiles 8192x16x2 4096x8x4 16384x32x1} \
    2>&1 >"$OUT/loss.jsonl" | tail -5 | tee -a "$summary"
  tee -a "$summary" < "$OUT/loss.jsonl"
fi
if [ $# -eq 0 ]; then
  set -- default@gpt2-1.5b default@gpt2-124m default@gpt2-774m lossk@gpt2-124m
fi
# the jobs stop by BUDGET seconds from this script's start (default 570: the device tool's 590 less the copy
# below), so what finished comes back even when the waves run long (the tool's own kill would lose it all)
left=$(( ${BUDGET:-570} - SECONDS - 10 ))
timeout "$(( left > 30 ? left : 30 ))" python3 benchmarks/mfu_variants.py --parallel --memory "$mem" \
  --limit "${LIMIT:-250}" --out "$work" --args "--profile $work/profiles ${ARGS:-}" "$@" 2>&1 | tee -a "$summary"
rc=${PIPESTATUS[0]}
cp "$work/mfu.jsonl" "$OUT/" 2>/dev/null
tar -czf "$OUT/profiles.tgz" -C "$work" --exclude='*.json.gz' --exclude='mfu-gate-*' . 2>/dev/null
rm -rf "$work"
exit "$rc"
