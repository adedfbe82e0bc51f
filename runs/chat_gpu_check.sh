#!/usr/bin/env bash
# Midtraining and SFT throughput on one GPU: a few steps of scripts/mid_train.py and scripts/chat_sft.py from
# a base checkpoint of DEPTH (a freshly initialised one unless $NANOCHAT_BASE_DIR has base_checkpoints/d<DEPTH>),
# then one line each of tok/s and MFU. Task data: $NANOCHAT_TASKS_URL (and the WORDS/IDENTITY variables) when
# set, else toy data (dev/toy_task_data.py --long). No network needed. Needs a tokenizer in $NANOCHAT_BASE_DIR
# (runs/gpu_check.sh's base run leaves one there). PYTHON picks the interpreter (default python3).
#
#   NANOCHAT_BASE_DIR=/tmp/gpucheck bash runs/chat_gpu_check.sh [DEPTH=20] [STEPS=15] [DEVICE_BATCH=16]
#
# The checkpoints and logs go to mid_checkpoints/ and chatsft_checkpoints/ under the tag chatcheck_d<DEPTH>.
set -euo pipefail
DEPTH=${1:-20}
STEPS=${2:-15}
DEVICE_BATCH=${3:-16}   # mid rows of 2048 tokens per forward pass (the reference's 32 fills 80 GB at d20)
DEVICE_TYPE=${NANOCHAT_CHECK_DEVICE:-cuda}
SEQ_LEN=${NANOCHAT_CHECK_SEQ_LEN:-2048}
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"
PYTHON=${PYTHON:-python3}
BASE_DIR=$("$PYTHON" -c "from nanochat.common import get_base_dir; print(get_base_dir())")
TAG="chatcheck_d$DEPTH"

# A base checkpoint to start from: the trained d<DEPTH> if there is one, else fresh weights (throughput does not care)
"$PYTHON" - "$BASE_DIR" "$DEPTH" "$TAG" "$SEQ_LEN" <<'EOF'
import os, shutil, sys
import torch
from nanochat.checkpoint_manager import list_steps, save_checkpoint
from nanochat.gpt import GPTConfig, build_gpt
from nanochat.tokenizer import get_tokenizer
base, depth, tag, seq_len = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
target = os.path.join(base, "base_checkpoints", tag)
trained = os.path.join(base, "base_checkpoints", f"d{depth}")
if list_steps(target):
    pass
elif list_steps(trained):
    shutil.copytree(trained, target, dirs_exist_ok=True)
    print(f"Starting from the trained base checkpoint in {trained}")
else:
    dim = 64 * depth
    heads = -(-dim // 128)
    config = dict(sequence_len=seq_len, vocab_size=get_tokenizer().get_vocab_size(), n_layer=depth,
                  n_head=heads, n_kv_head=heads, n_embd=dim)
    model = build_gpt(GPTConfig(**config), "cpu")
    save_checkpoint(target, 0, model.state_dict(), None, {"step": 0, "model_config": config, "user_config": {}})
    print(f"Fresh base checkpoint of depth {depth} in {target}")
EOF
if [ -z "${NANOCHAT_TASKS_URL:-}" ]; then
    "$PYTHON" -m dev.toy_task_data "$BASE_DIR/toy_tasks" --long
    export NANOCHAT_TASKS_URL="file://$BASE_DIR/toy_tasks"
    export NANOCHAT_WORDS_URL="file://$BASE_DIR/toy_tasks/words_alpha.txt"
    export NANOCHAT_IDENTITY_URL="file://$BASE_DIR/toy_tasks/identity_conversations.jsonl"
fi
rm -rf "$BASE_DIR/mid_checkpoints/$TAG" "$BASE_DIR/chatsft_checkpoints/$TAG"

echo "[chat check] mid_train: $STEPS steps of $DEVICE_BATCH x $SEQ_LEN tokens (torch.compile on CUDA)"
"$PYTHON" -m scripts.mid_train --device_type="$DEVICE_TYPE" --model_tag="$TAG" --max_seq_len="$SEQ_LEN" \
    --device_batch_size="$DEVICE_BATCH" --total_batch_size="$((DEVICE_BATCH * SEQ_LEN))" --num_iterations="$STEPS" \
    --eval_every=-1
echo "[chat check] chat_sft: $STEPS steps of 32 conversations (4 per forward pass, as the reference)"
"$PYTHON" -m scripts.chat_sft --device_type="$DEVICE_TYPE" --model_tag="$TAG" --num_iterations="$STEPS" \
    --eval_every=-1 --eval_metrics_every=-1

# Steady state: the median over the steps after the first 3 (compilation and warm-up)
"$PYTHON" - "$BASE_DIR" "$TAG" <<'EOF'
import json, os, statistics, sys
base, tag = sys.argv[1], sys.argv[2]
print("| stage | steps timed | median tok/s | median MFU % | tokens per step |")
print("|---|---|---|---|---|")
for stage, folder in (("mid_train", "mid_checkpoints"), ("chat_sft", "chatsft_checkpoints")):
    with open(os.path.join(base, folder, tag, "log.jsonl")) as f:
        steps = [r for r in map(json.loads, f) if "dt" in r and r["step"] >= 3]
    tokens = statistics.median(r.get("tokens", r["tok_per_sec"] * r["dt"]) for r in steps)
    print(f"| {stage} | {len(steps)} | {statistics.median(r['tok_per_sec'] for r in steps):,.0f} | "
          f"{statistics.median(r['mfu'] for r in steps):.2f} | {tokens:,.0f} |")
EOF
