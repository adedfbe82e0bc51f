# Sourced by the GPU tiers (speedrun.sh, runs/run1000.sh) once they have set their sizes: every stage from the
# data to the report card, each on NPROC_PER_NODE processes through torchrun. The tier sets PIPELINE_NAME,
# TIER (the prefix of its <TIER>_<SCRIPT>_ARGS variables), CALLER_DIR, NPROC_PER_NODE, WANDB_RUN, DEVICE_TYPE,
# DEPTH, SHARDS, TOK_SHARDS, TOK_MAX_CHARS, VOCAB_SIZE, SAVE_MINUTES and DEVICE_BATCH (empty, or a
# --device_batch_size=N for pretraining and midtraining). NANOCHAT_RL=1 adds the RL stage.
MODEL_TAG="d$DEPTH"
export OMP_NUM_THREADS=1  # one process per GPU: keep each one's CPU threads from fighting
# seconds torchrun gives the workers to save after a stop before it kills them (its default: 30)
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-300}

# launch SCRIPT SETTINGS...: python -m scripts.SCRIPT on NPROC_PER_NODE processes of DEVICE_TYPE, plus the
# settings in <TIER>_<SCRIPT>_ARGS (SPEEDRUN_BASE_TRAIN_ARGS, RUN1000_CHAT_SFT_ARGS, ...)
launch() {
    local script=$1; shift
    local extra="${TIER}_${script^^}_ARGS"
    # shellcheck disable=SC2086  # the extra settings are split into words on purpose
    torchrun --standalone --nproc_per_node="$NPROC_PER_NODE" -m "scripts.$script" -- \
        --device_type="$DEVICE_TYPE" "$@" ${!extra:-}
}

# BASE_DIR, the failing-stage message, stage(), last_checkpoint_step(), print_chat_commands()
source "$REPO_ROOT/runs/stages.sh" "$PIPELINE_NAME"
echo "$PIPELINE_NAME: outputs in $BASE_DIR; $NPROC_PER_NODE processes ($DEVICE_TYPE); depth $DEPTH;" \
    "wandb run: $WANDB_RUN; RL: $([ "${NANOCHAT_RL:-0}" = 1 ] && echo on || echo "off (NANOCHAT_RL=1 turns it on)")"

# A new run starts a new report (system info and start time); a re-run continues the old one.
stage "report reset" "$BASE_DIR/report/header.md" python -m nanochat.report reset

# Data. Each shard is ~250M characters (~100 MB). The tokenizer's shards now; the rest of what pretraining needs
# (the tier says how many: 20 tokens per parameter at ~4.8 characters per token) in the background meanwhile.
STAGE="data (first $TOK_SHARDS shards)"
python -m nanochat.dataset -n "$TOK_SHARDS"
python -m nanochat.dataset -n "$SHARDS" > "$BASE_DIR/download.log" 2>&1 &
DOWNLOAD_PID=$!
trap 'kill "$DOWNLOAD_PID" 2>/dev/null || true' EXIT  # do not leave the download running if we stop early
echo "Downloading the remaining shards in the background (pid $DOWNLOAD_PID, log: $BASE_DIR/download.log)"

# Tokenizer: VOCAB_SIZE tokens trained on TOK_MAX_CHARS characters, then its compression measured.
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
        --save_every_minutes="$SAVE_MINUTES" $DEVICE_BATCH $RESUME
    if [ ! -e "$BASE_DIR/report/base-model-training.md" ]; then  # written only by a run that reached its end
        echo "$PIPELINE_NAME: training stopped at step $(last_checkpoint_step) before its end;" \
            "run $PIPELINE_NAME again to resume it." >&2
        exit 1
    fi
fi

# Evaluation: bits per byte on bigger train/val slices with a few samples, then CORE.
stage "base model loss and samples" "$BASE_DIR/report/base-model-loss.md" launch base_loss --model_tag="$MODEL_TAG"
LAST_STEP=$(printf %06d "$(last_checkpoint_step)")
stage "base model evaluation (CORE)" "$BASE_DIR/base_eval/base_model_$LAST_STEP.csv" \
    launch base_eval --model_tag="$MODEL_TAG"

# Midtraining (about 10 minutes on 8xH100 at depth 20): one epoch of ~850K conversations packed like pretraining data,
# teaching the chat special tokens, multiple choice, calculator use and spelling; identity conversations
# (who the model is) are part of the mixture. Then the six chat tasks and ChatCORE.
stage "identity conversations" "$BASE_DIR/task_data/identity_conversations.jsonl" \
    python -c "from tasks.customjson import identity_conversations_path; print(identity_conversations_path())"
resumable_stage "midtraining" mid_checkpoints "$BASE_DIR/report/midtraining.md" \
    launch mid_train --run="$WANDB_RUN" --model_tag="$MODEL_TAG" $DEVICE_BATCH
stage "chat evaluation (mid)" "$BASE_DIR/report/chat-evaluation-mid.md" launch chat_eval -i mid -g "$MODEL_TAG"

# Supervised fine-tuning: one conversation per row, loss on the assistant's tokens only; then the same evaluation.
resumable_stage "SFT" chatsft_checkpoints "$BASE_DIR/report/chat-sft.md" \
    launch chat_sft --run="$WANDB_RUN" --model_tag="$MODEL_TAG"
stage "chat evaluation (sft)" "$BASE_DIR/report/chat-evaluation-sft.md" launch chat_eval -i sft -g "$MODEL_TAG"

# Reinforcement learning on GSM8K (optional, as in the reference: NANOCHAT_RL=1): the SFT model samples answers
# to the train problems and learns from their rewards; then GSM8K again, to compare with the SFT model's.
if [ "${NANOCHAT_RL:-0}" = 1 ]; then
    resumable_stage "RL" chatrl_checkpoints "$BASE_DIR/report/chat-rl.md" \
        launch chat_rl --run="$WANDB_RUN" --model_tag="$MODEL_TAG"
    stage "chat evaluation (rl)" "$BASE_DIR/report/chat-evaluation-rl.md" \
        launch chat_eval -i rl -a GSM8K -g "$MODEL_TAG"
fi

# The report card: <base>/report.md, copied (with its plots) into the directory this was run from.
STAGE="report"
(cd "$CALLER_DIR" && python -m nanochat.report generate)
echo "$PIPELINE_NAME: done. Report: $CALLER_DIR/report.md"
print_chat_commands
