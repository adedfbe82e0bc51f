#!/usr/bin/env bash
# CPU training benchmark: our scripts.base_train against the reference nanochat (karpathy/nanochat
# f37d45c, a checkout given as REF_DIR) on the same data, tokenizer and settings:
#   depth 4, seq 512, device_batch_size 8, total batch 4096 tokens, vocab 8192, STEPS steps.
# Prints steady-state tok/s (mean step time after the first WARMUP steps, so compilation and warm-up
# are excluded), wall time of the whole run, and the final val bpb of each, then the ratio.
#
#   bash dev/bench_cpu.sh /path/to/reference          # 50 steps (or REF_DIR=/path/to/reference)
#   STEPS=20 bash dev/bench_cpu.sh REF_DIR            # quicker look
#   EXTRA="--dtype=float32" bash dev/bench_cpu.sh REF_DIR   # extra settings for our run only
#   AB_STEPS=0 bash dev/bench_cpu.sh REF_DIR          # skip the in-process A/B at the end
#   UPSTREAM_DIR=/path/to/upstream bash dev/bench_cpu.sh REF_DIR   # A/B also against upstream's bf16 mode
#
# On a shared machine the two sequential runs see different background load; the last part (an
# in-process A/B of the training steps, interleaved step by step) gives a ratio that load hits alike.
#
# Data: wherever NANOCHAT_DATA_URL points (a file:// copy of the shards avoids the download).
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$REPO_ROOT"
REF_DIR="${1:-${REF_DIR:-}}"
if [ -z "$REF_DIR" ] || [ ! -f "$REF_DIR/scripts/base_train.py" ]; then
    echo "usage: bash dev/bench_cpu.sh REF_DIR (or REF_DIR=... bash dev/bench_cpu.sh): a checkout of the" >&2
    echo "reference nanochat (karpathy/nanochat at f37d45c); got '${REF_DIR}', which has no scripts/base_train.py" >&2
    exit 1
fi
REF_DIR="$(cd "$REF_DIR" && pwd)"
STEPS="${STEPS:-50}"
WARMUP="${WARMUP:-10}"
EVAL_TOKENS="${EVAL_TOKENS:-65536}"  # 16 micro-batches of validation text
EXTRA="${EXTRA:-}"
PY="$REPO_ROOT/.venv/bin/python"
OUT="$REPO_ROOT/out/bench_cpu_logs"
export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$REPO_ROOT/out/bench_cpu}"
export NANOCHAT_DATA_MAX_SHARD="${NANOCHAT_DATA_MAX_SHARD:-10}"
mkdir -p "$OUT"

# 1) the same data and tokenizer for both (the reference reads our tokenizer.pkl: same format)
"$PY" -m nanochat.dataset -n "$NANOCHAT_DATA_MAX_SHARD"
if [ ! -f "$NANOCHAT_BASE_DIR/tokenizer/tokenizer.pkl" ]; then
    "$PY" -m scripts.tok_train --max_chars=30000000 --vocab_size=8192
fi
# the reference imports HuggingFace `tokenizers` at the top of its tokenizer module; keep it out of our venv
REF_DEPS="$REPO_ROOT/out/refdeps"
if ! "$PY" -c "import tokenizers" 2>/dev/null && [ ! -d "$REF_DEPS/tokenizers" ]; then
    "$PY" -m pip install --quiet --no-deps --target "$REF_DEPS" tokenizers
fi

COMMON=(--device_type=cpu --depth=4 --max_seq_len=512 --device_batch_size=8 --total_batch_size=4096
        --num_iterations="$STEPS" --eval_every="$STEPS" --eval_tokens="$EVAL_TOKENS" --core_metric_every=-1)

# 2) ours
echo "== ours: python -m scripts.base_train ${COMMON[*]} $EXTRA"
start=$(date +%s%N)
"$PY" -m scripts.base_train "${COMMON[@]}" --sample_every=-1 --model_tag=bench_ours $EXTRA > "$OUT/ours.log" 2>&1 \
    || { tail -30 "$OUT/ours.log"; exit 1; }
ours_wall=$(( ($(date +%s%N) - start) / 1000000 ))  # ms

# 3) the reference (it samples whenever step % sample_every == 0: a large value leaves only the last step)
echo "== reference ($REF_DIR): python -m scripts.base_train ${COMMON[*]}"
start=$(date +%s%N)
(cd "$REF_DIR" && PYTHONPATH="$REF_DIR:$REF_DEPS" "$PY" -m scripts.base_train "${COMMON[@]}" \
    --sample_every=$((STEPS * 1000)) --model_tag=bench_ref > "$OUT/ref.log" 2>&1) \
    || { tail -30 "$OUT/ref.log"; exit 1; }
ref_wall=$(( ($(date +%s%N) - start) / 1000000 ))

# 4) summary
"$PY" - "$OUT/ours.log" "$OUT/ref.log" "$ours_wall" "$ref_wall" "$WARMUP" <<'EOF'
import re, sys
ours_log, ref_log = sys.argv[1], sys.argv[2]
ours_wall, ref_wall, warmup = float(sys.argv[3]) / 1000, float(sys.argv[4]) / 1000, int(sys.argv[5])

def summary(path):
    text = open(path).read()
    steps = [(int(s), float(dt)) for s, dt in re.findall(r"step (\d+)/\d+ .*?dt: ([\d.]+)ms", text)]
    timed = [dt for s, dt in steps if s >= warmup] or [dt for _, dt in steps]
    bpbs = re.findall(r"[Vv]alidation bpb: ([\d.]+)", text)
    losses = re.findall(r"step \d+/\d+ .*?loss: ([\d.]+)", text)
    precision = re.search(r"Precision: (.*)", text)
    return {"tok_per_sec": 4096 / (sum(timed) / len(timed) / 1000), "val_bpb": float(bpbs[-1]),
            "loss": float(losses[-1]), "steps": len(steps),
            "precision": precision.group(1) if precision else "fp32 matmuls, torch.compile"}

ours, ref = summary(ours_log), summary(ref_log)
from nanochat import hardware
bf16 = hardware.cpu_has_native_bf16()
print(f"\nCPU: {hardware.cpu_model()} ({'native bf16' if bf16 else 'no native bf16'}), "
      f"{__import__('os').cpu_count()} cores")
print(f"{'':10} {'tok/s':>9} {'val bpb':>8} {'loss':>8} {'wall s':>8}  settings")
for name, run, wall in (("ours", ours, ours_wall), ("reference", ref, ref_wall)):
    print(f"{name:10} {run['tok_per_sec']:9.0f} {run['val_bpb']:8.4f} {run['loss']:8.4f} {wall:8.1f}  "
          f"{run['precision']}")
print(f"ratio ours/reference: tok/s {ours['tok_per_sec'] / ref['tok_per_sec']:.2f}x | "
      f"wall time {ref_wall / ours_wall:.2f}x faster | "
      f"val bpb {ours['val_bpb'] - ref['val_bpb']:+.4f} (lower is better)")
print(f"(tok/s: mean step time of steps >= {warmup}; logs in {__import__('os').path.dirname(ours_log)})")
EOF

# 5) in-process A/B: one training step of each, interleaved, so background load hits all alike
# (dev/bench_train_ab.py; with UPSTREAM_DIR set, upstream nanochat's bf16 mode too)
AB_STEPS="${AB_STEPS:-10}"
if [ "$AB_STEPS" -gt 0 ]; then
    echo
    echo "== in-process A/B, depth 4, batch 8 x 512, $AB_STEPS interleaved steps each"
    "$PY" -m dev.bench_train_ab --ref_dir="$REF_DIR" --upstream_dir="${UPSTREAM_DIR:-}" --steps="$AB_STEPS"
fi
