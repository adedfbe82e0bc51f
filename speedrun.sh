#!/usr/bin/env bash
# The reference run: a depth-20 GPT (~560M parameters) pretrained on an 8xGPU node (about 3 hours
# of pretraining on 8xH100), evaluated, midtrained and fine-tuned into a chat model (optionally improved by
# reinforcement learning), with a report card at the end.
#
#   bash speedrun.sh
#   WANDB_RUN=d20 NPROC_PER_NODE=8 screen -L -Logfile speedrun.log -S speedrun bash speedrun.sh
#
# NPROC_PER_NODE (default 8): GPUs to use. WANDB_RUN (default "dummy" = no wandb; run `wandb login`
# first otherwise). NANOCHAT_BASE_DIR, NANOCHAT_DATA_URL, NANOCHAT_DATA_MAX_SHARD and
# NANOCHAT_EVAL_BUNDLE_URL are honoured by the stages. Re-running skips the stages whose outputs
# exist, so after a failure fix the cause and run it again.
#
# Stopping: Ctrl-C (or SIGTERM to torchrun) makes the workers finish the step or evaluation task in hand,
# save a checkpoint and exit; torchrun waits up to TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds (300 here) for
# that before it kills them. Training also saves every SPEEDRUN_SAVE_MINUTES (30) minutes, so a crash
# loses at most that much. Run speedrun.sh again to resume.
#
# Every size can be overridden from the environment, down to a dry pass of every stage on a CPU:
#   SPEEDRUN_DEVICE_TYPE=cpu NPROC_PER_NODE=2 SPEEDRUN_DEPTH=2 SPEEDRUN_SHARDS=3 SPEEDRUN_TOK_SHARDS=3 \
#   SPEEDRUN_TOK_MAX_CHARS=1000000 SPEEDRUN_VOCAB_SIZE=1024 SPEEDRUN_TOK_EVAL_ARGS=--no_baselines \
#   SPEEDRUN_BASE_TRAIN_ARGS="--max_seq_len=256 --device_batch_size=2 --total_batch_size=1024 --num_iterations=6" \
#   SPEEDRUN_BASE_LOSS_ARGS="--device_batch_size=2 --split_tokens=2048" SPEEDRUN_BASE_EVAL_ARGS=--max_per_task=11 \
#   SPEEDRUN_MID_TRAIN_ARGS="--max_seq_len=256 --device_batch_size=2 --total_batch_size=1024 --num_iterations=6" \
#   SPEEDRUN_CHAT_SFT_ARGS="--max_seq_len=256 --device_batch_size=2 --target_examples_per_step=8 --num_iterations=6" \
#   SPEEDRUN_CHAT_EVAL_ARGS="-x 8 -m 32" bash speedrun.sh
# (SPEEDRUN_<SCRIPT>_ARGS adds settings to any stage run through `launch`.) NANOCHAT_RL=1 adds the optional
# reinforcement learning on GSM8K and its evaluation (the reference has them commented out); at toy size add
#   SPEEDRUN_CHAT_RL_ARGS="--num_iterations=2 --examples_per_step=2 --num_samples=4 --device_batch_size=4
#   --max_new_tokens=16 --eval_examples=4"
# The stages themselves are in runs/pipeline.sh, shared with runs/run1000.sh (the larger tier).
set -Eeuo pipefail  # -E: the ERR trap below also fires inside functions
CALLER_DIR="$PWD"
source "$(dirname "$0")/runs/setup_env.sh"  # creates .venv on first use, then activates it
cd "$REPO_ROOT"

PIPELINE_NAME=speedrun.sh
TIER=SPEEDRUN
NPROC_PER_NODE=${NPROC_PER_NODE:-8}
WANDB_RUN=${WANDB_RUN:-dummy}
DEVICE_TYPE=${SPEEDRUN_DEVICE_TYPE:-cuda}   # never a silent fallback to CPU processes on a GPU node
DEPTH=${SPEEDRUN_DEPTH:-20}
SHARDS=${SPEEDRUN_SHARDS:-240}              # d20: 11.2B tokens = ~54B characters = ~216 shards, and a margin
TOK_SHARDS=${SPEEDRUN_TOK_SHARDS:-8}        # training shards the tokenizer needs (downloaded first)
TOK_MAX_CHARS=${SPEEDRUN_TOK_MAX_CHARS:-2000000000}
VOCAB_SIZE=${SPEEDRUN_VOCAB_SIZE:-65536}
SAVE_MINUTES=${SPEEDRUN_SAVE_MINUTES:-30}
DEVICE_BATCH=""                             # base_train's and mid_train's default (32) fits an 80 GB GPU at d20
source "$REPO_ROOT/runs/pipeline.sh"
