#!/usr/bin/env bash
# The MFU experiments for one device call: each variant of benchmarks/train_mfu.py runs in its own process
# (the --sdpa and --inductor settings are process-wide) with its own time limit; every finished shape is
# appended to $OUT/mfu.jsonl as one JSON line tagged with the variant, so a call cut short keeps what finished.
#
#   SHAPES="gpt2-124m gpt2-1.5b" bash benchmarks/mfu_variants.sh default master master+cdt
#
# Variants (names below); SHAPES defaults to all four; LIMIT is seconds per variant (default 280: set it so
# that the variants of one call fit the device tool's 10 minutes); ARGS are passed on (e.g.
# ARGS="--device cpu --smoke --steps 2 --warmup 1" checks this script on a CPU). Exit status: 0 when every
# variant finished, else 1 (a timed-out variant's finished shapes are still in mfu.jsonl); 2 for a bad variant.
# Logs: $OUT/mfu-<variant>.log. Record the figures in benchmarks/RESULTS.md with command, device and date.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$PWD/build/inductor-cache}  # reused while warm
read -r -a shapes <<< "${SHAPES:-gpt2-124m gpt2-350m gpt2-774m gpt2-1.5b}"

flags_of() {
  case "$1" in
    default)    echo "" ;;
    master)     echo "--set optim.master_weights=on" ;;
    cdt)        echo "--inductor coordinate_descent_tuning=True" ;;
    fused)      echo "--set run.fused_loss=on" ;;
    master+fused) echo "--set optim.master_weights=on --set run.fused_loss=on" ;;
    master+cdt) echo "--set optim.master_weights=on --inductor coordinate_descent_tuning=True" ;;
    master+2pass) echo "--set optim.master_weights=on --inductor online_softmax=False" ;;  # the loss: max, then sum
    autotune)   echo "--set optim.master_weights=on --compile-mode max-autotune-no-cudagraphs" ;;
    graphs)     echo "--set optim.master_weights=on --compile-mode reduce-overhead" ;;
    flash)      echo "--set optim.master_weights=on --sdpa flash" ;;
    *)          return 1 ;;
  esac
}

for variant in "$@"; do  # all names checked before any runs
  if ! flags_of "$variant" > /dev/null; then
    echo "unknown variant '$variant'; known: default master fused master+fused cdt master+cdt master+2pass autotune graphs flash" >&2
    exit 2
  fi
done
failed=0
for variant in "$@"; do
  flags=$(flags_of "$variant")
  # shellcheck disable=SC2086  # flags are words
  timeout -k 10 "${LIMIT:-280}" python benchmarks/train_mfu.py --shapes "${shapes[@]}" $flags ${ARGS:-} \
    > "$OUT/mfu-$variant.json" 2> "$OUT/mfu-$variant.log"
  rc=$?
  [ "$rc" -eq 0 ] || failed=1
  # one line per finished shape, tagged with the variant (rows printed before a timeout are kept)
  python - "$OUT/mfu-$variant.json" "$variant" >> "$OUT/mfu.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    if line.startswith('{"row"'):
        print(json.dumps({**json.loads(line)["row"], "variant": sys.argv[2]}))
PY
  echo "== $variant (exit $rc$([ "$rc" -eq 124 ] && echo ': time limit'))"
  grep -E "tok/s|Error|error" "$OUT/mfu-$variant.log" | tail -8 || true
done
exit "$failed"
