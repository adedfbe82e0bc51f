#!/usr/bin/env bash
# The whole pipeline on a laptop CPU, about 20 minutes on 2 cores: data -> tokenizer -> pretraining a tiny
# model -> val bpb and samples -> CORE -> midtraining -> chat eval -> SFT -> chat eval -> a few steps of RL
# -> GSM8K eval -> report.md.
# The model is far too small to be good; the point is to see every stage run and read its report.
#
#   bash runs/runcpu.sh
#   NANOCHAT_DATA_URL=file://$PWD/../shared/data/corpus NANOCHAT_DATA_MAX_SHARD=10 \
#   NANOCHAT_EVAL_BUNDLE_URL=file://$PWD/../shared/data/eval_bundle.zip \
#   NANOCHAT_TASKS_URL=file://$PWD/../shared/data/tasks \
#   NANOCHAT_WORDS_URL=file://$PWD/../shared/data/tasks/words_alpha.txt \
#   NANOCHAT_IDENTITY_URL=file://$PWD/../shared/data/tasks/identity_conversations.jsonl bash runs/runcpu.sh
#   (fully offline; some chat sets there are stand-ins, see ../shared/README.md)
#
# Everything goes to $NANOCHAT_BASE_DIR (default ~/.cache/nanochat); report.md is also copied into the
# directory you run this from. Re-running skips the stages whose outputs exist: delete the base dir
# (or the stage's output) to redo them.
set -Eeuo pipefail  # -E: the ERR trap below also fires inside functions
CALLER_DIR="$PWD"
source "$(dirname "$0")/setup_env.sh"  # creates .venv on first use, then activates it
cd "$REPO_ROOT"

# Sizes. Each can be overridden from the environment (the tests run this at toy size that way).
# FineWeb-Edu shards hold ~250M characters each, so 4 are plenty; a small custom corpus
# (NANOCHAT_DATA_MAX_SHARD set, e.g. ../shared/data/corpus) is taken whole, up to 10 training shards.
DEFAULT_SHARDS=4
if [ -n "${NANOCHAT_DATA_MAX_SHARD:-}" ]; then DEFAULT_SHARDS=10; fi
SHARDS=${NANOCHAT_RUNCPU_SHARDS:-$DEFAULT_SHARDS}
TOK_MAX_CHARS=${NANOCHAT_RUNCPU_TOK_MAX_CHARS:-30000000}   # tokenizer training text
VOCAB_SIZE=${NANOCHAT_RUNCPU_VOCAB_SIZE:-8192}
DEPTH=${NANOCHAT_RUNCPU_DEPTH:-4}                           # 4 layers, width 256
SEQ_LEN=${NANOCHAT_RUNCPU_SEQ_LEN:-512}
DEVICE_BATCH=${NANOCHAT_RUNCPU_DEVICE_BATCH:-8}             # sequences per forward pass
TOTAL_BATCH=${NANOCHAT_RUNCPU_TOTAL_BATCH:-4096}            # tokens per optimizer step
STEPS=${NANOCHAT_RUNCPU_STEPS:-800}
EVAL_EVERY=${NANOCHAT_RUNCPU_EVAL_EVERY:-100}               # val bpb during training
EVAL_TOKENS=${NANOCHAT_RUNCPU_EVAL_TOKENS:-32768}           # per val bpb measurement
CORE_MAX_PER_TASK=${NANOCHAT_RUNCPU_CORE_MAX_PER_TASK:-24}  # examples per CORE task (more than the 10 few-shot ones)
MID_STEPS=${NANOCHAT_RUNCPU_MID_STEPS:-40}                  # midtraining steps (TOTAL_BATCH tokens each)
SFT_STEPS=${NANOCHAT_RUNCPU_SFT_STEPS:-40}                  # SFT steps (SFT_EXAMPLES conversations each)
SFT_EXAMPLES=${NANOCHAT_RUNCPU_SFT_EXAMPLES:-8}             # conversations per SFT step
CHAT_PROBLEMS=${NANOCHAT_RUNCPU_CHAT_PROBLEMS:-24}          # problems per chat_eval task
CHAT_MAX_TOKENS=${NANOCHAT_RUNCPU_CHAT_MAX_TOKENS:-128}     # longest answer in the generative tasks
RL_STEPS=${NANOCHAT_RUNCPU_RL_STEPS:-8}                     # RL steps (4 problems x 4 samples each)
RL_MAX_TOKENS=${NANOCHAT_RUNCPU_RL_MAX_TOKENS:-64}          # longest sampled answer in RL
MODEL_TAG="d${DEPTH}"
# In the training stages, threads that wait for work sleep at once instead of spinning first: with anything else
# running on the machine, spinning threads made training ~3x slower here (2.1 s vs 6.1 s per step with other jobs
# running), and on a quiet one it costs nothing (a d4 step 567 vs 574 ms). The stages that generate text keep
# libgomp's default (spin a little, then sleep): a decode step is dozens of small parallel kernels, and with
# sleeping threads each waits for a wake-up (a quiet 2-core AMD EPYC: compiled decoding 475 vs 2,356 tok/s at
# batch 1, 2,091 vs 7,143 at batch 8). An OMP_WAIT_POLICY set by the caller holds for every stage.
TRAINING_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
training() { OMP_WAIT_POLICY=$TRAINING_WAIT_POLICY "$@"; }

# BASE_DIR, the failing-stage message, stage(), last_checkpoint_step(), print_chat_commands()
source "$REPO_ROOT/runs/stages.sh" runcpu.sh
echo "runcpu.sh: outputs in $BASE_DIR"

# A new run starts a new report; a re-run after a failure continues the old one.
stage "report reset" "$BASE_DIR/report/header.md" python -m nanochat.report reset
STAGE="data"
python -m nanochat.dataset -n "$SHARDS"  # skips the shards already there
stage "tokenizer" "$BASE_DIR/tokenizer/token_bytes.pt" \
    python -m scripts.tok_train --max_chars="$TOK_MAX_CHARS" --vocab_size="$VOCAB_SIZE"
stage "tokenizer evaluation" "$BASE_DIR/report/tokenizer-evaluation.md" python -m scripts.tok_eval

# Pretraining. No CORE or samples during training: the stages below do both once, at the end.
# A run stopped early (Ctrl-C saves a checkpoint) resumes exactly where it stopped.
STAGE="base model training"
LAST_STEP=$(last_checkpoint_step)
if [ "$LAST_STEP" -ge "$STEPS" ]; then
    echo "[skip] $STAGE: base_checkpoints/$MODEL_TAG has step $LAST_STEP"
else
    RESUME=""  # empty, or --resume_from_step=N (unquoted below, so empty adds no argument)
    if [ "$LAST_STEP" -ge 0 ]; then RESUME="--resume_from_step=$LAST_STEP"; fi
    echo "[run] $STAGE ${RESUME:+(resuming from step $LAST_STEP)}"
    training python -m scripts.base_train \
        --depth="$DEPTH" --max_seq_len="$SEQ_LEN" \
        --device_batch_size="$DEVICE_BATCH" --total_batch_size="$TOTAL_BATCH" \
        --num_iterations="$STEPS" \
        --eval_every="$EVAL_EVERY" --eval_tokens="$EVAL_TOKENS" \
        --core_metric_every=-1 --sample_every=-1 --save_every=-1 \
        --model_tag="$MODEL_TAG" $RESUME
    LAST_STEP=$(last_checkpoint_step)
    if [ "$LAST_STEP" -lt "$STEPS" ]; then
        echo "runcpu.sh: training stopped at step $LAST_STEP of $STEPS; run runcpu.sh again to resume it." >&2
        exit 1
    fi
fi
stage "base model loss and samples" "$BASE_DIR/report/base-model-loss.md" \
    training python -m scripts.base_loss --model_tag="$MODEL_TAG" \
        --device_batch_size="$DEVICE_BATCH" --split_tokens="$EVAL_TOKENS"
stage "base model evaluation (CORE)" "$BASE_DIR/base_eval/base_model_$(printf %06d "$STEPS").csv" \
    training python -m scripts.base_eval --model_tag="$MODEL_TAG" --max_per_task="$CORE_MAX_PER_TASK"

# A few samples of the base model, streamed (the report holds base_loss's greedy ones).
STAGE="samples"
python -m scripts.sample --model_tag="$MODEL_TAG" --prompt="The capital of France is" --num_samples=3 --max_tokens=32

# Midtraining: the conversation format, multiple choice, the calculator and spelling, on the same packed
# stream as pretraining; then the chat evaluation (a few problems per task).
resumable_stage "midtraining" mid_checkpoints "$BASE_DIR/report/midtraining.md" \
    training python -m scripts.mid_train --model_tag="$MODEL_TAG" --max_seq_len="$SEQ_LEN" \
        --device_batch_size="$DEVICE_BATCH" --total_batch_size="$TOTAL_BATCH" --num_iterations="$MID_STEPS" \
        --eval_every="$EVAL_EVERY" --eval_tokens="$EVAL_TOKENS"
stage "chat evaluation (mid)" "$BASE_DIR/report/chat-evaluation-mid.md" \
    python -m scripts.chat_eval -i mid -g "$MODEL_TAG" -x "$CHAT_PROBLEMS" -m "$CHAT_MAX_TOKENS"

# SFT: one conversation per row, loss on the assistant's tokens only; then the same evaluation.
resumable_stage "SFT" chatsft_checkpoints "$BASE_DIR/report/chat-sft.md" \
    training python -m scripts.chat_sft --model_tag="$MODEL_TAG" --num_iterations="$SFT_STEPS" \
        --device_batch_size="$((SFT_EXAMPLES / 2))" --target_examples_per_step="$SFT_EXAMPLES" \
        --max_seq_len="$SEQ_LEN" \
        --eval_every="$EVAL_EVERY" --eval_steps=8 --eval_metrics_every=-1 --eval_metrics_max_problems="$CHAT_PROBLEMS"
stage "chat evaluation (sft)" "$BASE_DIR/report/chat-evaluation-sft.md" \
    python -m scripts.chat_eval -i sft -g "$MODEL_TAG" -x "$CHAT_PROBLEMS" -m "$CHAT_MAX_TOKENS"

# RL on GSM8K: a few steps at toy size (the real stage samples 16 problems x 16 answers of up to 256 tokens per
# step for an epoch), then GSM8K again. At this size the rewards stay near 0: the point is to see the stage run.
resumable_stage "RL" chatrl_checkpoints "$BASE_DIR/report/chat-rl.md" \
    python -m scripts.chat_rl --model_tag="$MODEL_TAG" --num_iterations="$RL_STEPS" --examples_per_step=4 \
        --num_samples=4 --device_batch_size=4 --max_new_tokens="$RL_MAX_TOKENS" --eval_every="$RL_STEPS" \
        --eval_examples="$CHAT_PROBLEMS" --save_every="$RL_STEPS"
stage "chat evaluation (rl)" "$BASE_DIR/report/chat-evaluation-rl.md" \
    python -m scripts.chat_eval -i rl -g "$MODEL_TAG" -a GSM8K -x "$CHAT_PROBLEMS" -m "$CHAT_MAX_TOKENS"

# The report card: <base>/report.md, copied (with its plots) into the directory this was run from.
STAGE="report"
(cd "$CALLER_DIR" && python -m nanochat.report generate)
echo "runcpu.sh: done. Report: $CALLER_DIR/report.md"
print_chat_commands
