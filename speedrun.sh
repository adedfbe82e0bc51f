#!/usr/bin/env bash
# The reference run: a depth-20 GPT (~560M parameters) pretrained on an 8xGPU node (about 3 hours
# of pretraining on 8xH100), evaluated, midtrained and fine-tuned into a chat model, with a report card at the end.
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
# (SPEEDRUN_<SCRIPT>_ARGS adds settings to any stage run through `launch`.)
set -Eeuo pipefail  # -E: the ERR trap below also fires inside functions
CALLER_DIR="$PWD"
source "$(dirname "$0")/runs/setup_env.sh"  # creates .venv on first use, then activates it
cd "$REPO_ROOT"

NPROC_PER_NODE=${NPROC_PER_NODE:-8}
WANDB_RUN=${WANDB_RUN:-dummy}
DEVICE_TYPE=${SPEEDRUN_DEVICE_TYPE:-cuda}   # never a silent fallback to CPU processes on a GPU node
DEPTH=${SPEEDRUN_DEPTH:-20}
SHARDS=${SPEEDRUN_SHARDS:-240}              # training shards for pretraining
TOK_SHARDS=${SPEEDRUN_TOK_SHARDS:-8}        # training shards the tokenizer needs (downloaded first)
TOK_MAX_CHARS=${SPEEDRUN_TOK_MAX_CHARS:-2000000000}
VOCAB_SIZE=${SPEEDRUN_VOCAB_SIZE:-65536}
SAVE_MINUTES=${SPEEDRUN_SAVE_MINUTES:-30}
MODEL_TAG="d$DEPTH"
export OMP_NUM_THREADS=1  # one process per GPU: keep each one's CPU threads from fighting
# seconds torchrun gives the workers to save after a stop before it kills them (its default: 30)
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-300}

# launch SCRIPT SETTINGS...: python -m scripts.SCRIPT on NPROC_PER_NODE processes of DEVICE_TYPE, plus the
# settings in SPEEDRUN_<SCRIPT>_ARGS
launch() {
    local script=$1; shift
    local extra="SPEEDRUN_${script^^}_ARGS"
    # shellcheck disable=SC2086  # the extra settings are split into words on purpose
    torchrun --standalone --nproc_per_node="$NPROC_PER_NODE" -m "scripts.$script" -- \
        --device_type="$DEVICE_TYPE" "$@" ${!extra:-}
}

# BASE_DIR, the failing-stage message, stage(), last_checkpoint_step(), print_chat_commands()
source "$REPO_ROOT/runs/stages.sh" speedrun.sh
echo "speedrun.sh: outputs in $BASE_DIR; $NPROC_PER_NODE processes ($DEVICE_TYPE); depth $DEPTH; wandb run: $WANDB_RUN"

# A new run starts a new report (system info and start time); a re-run continues the old one.
stage "report reset" "$BASE_DIR/report/header.md" python -m nanochat.report reset

# Data. Each shard is ~250M characters (~100 MB). The tokenizer needs ~2B characters: 8 shards, now.
# Pretraining d20 needs 20 tokens per parameter = ~11.2B tokens = ~54B characters at ~4.8 chars per
# token = ~216 shards: 240 to be safe, downloaded in the background while the tokenizer trains.
STAGE="data (first $TOK_SHARDS shards)"
python -m nanochat.dataset -n "$TOK_SHARDS"
python -m nanochat.dataset -n "$SHARDS" > "$BASE_DIR/download.log" 2>&1 &
DOWNLOAD_PID=$!
trap 'kill "$DOWNLOAD_PID" 2>/dev/null || true' EXIT  # do not leave the download running if we stop early
echo "Downloading the remaining shards in the background (pid $DOWNLOAD_PID, log: $BASE_DIR/download.log)"

# Tokenizer: vocab 65536 (2^16) trained on ~2B characters, then its compression measured.
stage "tokenizer" "$BASE_DIR/tokenizer/token_bytes.pt" \
    python -m scripts.tok_train --max_chars="$TOK_MAX_CHARS" --vocab_size="$VOCAB_SIZE"
# shellcheck disable=SC2086
stage "tokenizer evaluation" "$BASE_DIR/report/tokenizer-evaluation.md" \
    python -m scripts.tok_eval ${SPEEDRUN_TOK_EVAL_ARGS:-}

STAGE="data (all $SHARDS shards)"
echo "Waiting for the background download to finish..."
if ! wait "$DOWNLOAD_PID"; then
    tail -n 20 "$BASE_DIR/download.log" >&2
    false  # fails the stage with the message above
fi

# Pretraining. A finished run leaves its final checkpoint and its report section; a run stopped early
# (Ctrl-C or SIGTERM save a checkpoint) resumes exactly where it stopped.
STAGE="base model training"
LAST_STEP=$(last_checkpoint_step)
if [ -e "$BASE_DIR/report/base-model-training.md" ] && [ "$LAST_STEP" -ge 0 ]; then
    echo "[skip] $STAGE: finished (report section and base_checkpoints/$MODEL_TAG step $LAST_STEP exist)"
else
    RESUME=""  # empty, or --resume_from_step=N (unquoted below, so empty adds no argument)
    if [ "$LAST_STEP" -ge 0 ]; then RESUME="--resume_from_step=$LAST_STEP"; fi
    echo "[run] $STAGE ${RESUME:+(resuming from step $LAST_STEP)}"
    launch base_train --depth="$DEPTH" --run="$WANDB_RUN" --model_tag="$MODEL_TAG" \
        --save_every_minutes="$SAVE_MINUTES" $RESUME
    if [ ! -e "$BASE_DIR/report/base-model-training.md" ]; then  # written only by a run that reached its end
        echo "speedrun.sh: training stopped at step $(last_checkpoint_step) before its end;" \
            "run speedrun.sh again to resume it." >&2
        exit 1
    fi
fi

# Evaluation: bits per byte on bigger train/val slices with a few samples, then CORE.
stage "base model loss and samples" "$BASE_DIR/report/base-model-loss.md" launch base_loss --model_tag="$MODEL_TAG"
LAST_STEP=$(printf %06d "$(last_checkpoint_step)")
stage "base model evaluation (CORE)" "$BASE_DIR/base_eval/base_model_$LAST_STEP.csv" \
    launch base_eval --model_tag="$MODEL_TAG"

# Midtraining (about 10 minutes on 8xH100): one epoch of ~850K conversations packed like pretraining data,
# teaching the chat special tokens, multiple choice, calculator use and spelling; identity conversations
# (who the model is) are part of the mixture. Then the six chat tasks and ChatCORE.
stage "identity conversations" "$BASE_DIR/task_data/identity_conversations.jsonl" \
    python -c "from tasks.customjson import identity_conversations_path; print(identity_conversations_path())"
resumable_stage "midtraining" mid_checkpoints "$BASE_DIR/report/midtraining.md" \
    launch mid_train --run="$WANDB_RUN" --model_tag="$MODEL_TAG"
stage "chat evaluation (mid)" "$BASE_DIR/report/chat-evaluation-mid.md" launch chat_eval -i mid -g "$MODEL_TAG"

# Supervised fine-tuning: one conversation per row, loss on the assistant's tokens only; then the same evaluation.
resumable_stage "SFT" chatsft_checkpoints "$BASE_DIR/report/chat-sft.md" \
    launch chat_sft --run="$WANDB_RUN" --model_tag="$MODEL_TAG"
stage "chat evaluation (sft)" "$BASE_DIR/report/chat-evaluation-sft.md" launch chat_eval -i sft -g "$MODEL_TAG"

# The report card: <base>/report.md, copied (with its plots) into the directory this was run from.
STAGE="report"
(cd "$CALLER_DIR" && python -m nanochat.report generate)
echo "speedrun.sh: done. Report: $CALLER_DIR/report.md"
print_chat_commands
