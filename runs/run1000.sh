#!/usr/bin/env bash
# The larger tier (the reference's run1000.sh, about $1000 of 8xH100 time, ~41 hours): a depth-32 GPT (~1.9B
# parameters) pretrained on ~38B tokens, then the same stages as speedrun.sh (runs/pipeline.sh): evaluation,
# midtraining, SFT, chat evaluation, optional RL (NANOCHAT_RL=1), report card.
#
#   bash runs/run1000.sh
#   WANDB_RUN=d32 NANOCHAT_RL=1 screen -L -Logfile run1000.log -S run1000 bash runs/run1000.sh
#
# The reference's sizing (its run1000.sh notes): at depth 32 a device batch of 16 runs out of 80 GB, 8 fits
# (4 gradient accumulation steps for the 524,288-token batch); 20 tokens per parameter = ~38B tokens =
# ~185B characters = ~740 shards, 800 to be safe; the tokenizer trains on ~4B characters (16 shards).
# Every size can be overridden from the environment with RUN1000_ in front (as SPEEDRUN_ in speedrun.sh),
# down to the same dry pass on a CPU:
#   RUN1000_DEVICE_TYPE=cpu NPROC_PER_NODE=2 RUN1000_DEPTH=2 RUN1000_SHARDS=3 RUN1000_TOK_SHARDS=3 \
#   RUN1000_TOK_MAX_CHARS=1000000 RUN1000_VOCAB_SIZE=1024 RUN1000_DEVICE_BATCH=2 RUN1000_TOK_EVAL_ARGS=--no_baselines \
#   RUN1000_BASE_TRAIN_ARGS="--max_seq_len=256 --total_batch_size=1024 --num_iterations=6" \
#   RUN1000_BASE_LOSS_ARGS="--device_batch_size=2 --split_tokens=2048" RUN1000_BASE_EVAL_ARGS=--max_per_task=11 \
#   RUN1000_MID_TRAIN_ARGS="--max_seq_len=256 --total_batch_size=1024 --num_iterations=6" \
#   RUN1000_CHAT_SFT_ARGS="--max_seq_len=256 --device_batch_size=2 --target_examples_per_step=8 --num_iterations=6" \
#   RUN1000_CHAT_EVAL_ARGS="-x 8 -m 32" bash runs/run1000.sh
set -Eeuo pipefail  # -E: the ERR trap below also fires inside functions
CALLER_DIR="$PWD"
source "$(dirname "$0")/setup_env.sh"  # creates .venv on first use, then activates it
cd "$REPO_ROOT"

PIPELINE_NAME=run1000.sh
TIER=RUN1000
NPROC_PER_NODE=${NPROC_PER_NODE:-8}
WANDB_RUN=${WANDB_RUN:-dummy}
DEVICE_TYPE=${RUN1000_DEVICE_TYPE:-cuda}
DEPTH=${RUN1000_DEPTH:-32}
SHARDS=${RUN1000_SHARDS:-800}
TOK_SHARDS=${RUN1000_TOK_SHARDS:-16}
TOK_MAX_CHARS=${RUN1000_TOK_MAX_CHARS:-4000000000}
VOCAB_SIZE=${RUN1000_VOCAB_SIZE:-65536}
SAVE_MINUTES=${RUN1000_SAVE_MINUTES:-30}
DEVICE_BATCH="--device_batch_size=${RUN1000_DEVICE_BATCH:-8}"  # pretraining and midtraining alike
source "$REPO_ROOT/runs/pipeline.sh"
