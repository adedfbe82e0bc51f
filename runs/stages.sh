# Sourced by the pipeline scripts (runs/runcpu.sh, speedrun.sh) after setup_env.sh, with the script's
# name as argument: sets BASE_DIR, names the failing stage on error, and defines `stage`,
# `last_checkpoint_step`, `resumable_stage` and `print_chat_commands` (which read MODEL_TAG).
PIPELINE_NAME=$1
STAGE="setup"
trap 'echo "$PIPELINE_NAME: stage \"$STAGE\" failed (see the messages above)." \
    "Fix it and re-run: finished stages are skipped." >&2' ERR
BASE_DIR=$(python -c "from nanochat.common import get_base_dir; print(get_base_dir())")

# stage NAME OUTPUT COMMAND...: runs COMMAND unless OUTPUT exists, so a re-run resumes where it stopped.
stage() {
    STAGE=$1; local output=$2; shift 2
    if [ -e "$output" ]; then
        echo "[skip] $STAGE: ${output#"$BASE_DIR"/} exists"
    else
        echo "[run] $STAGE"
        "$@"
    fi
}

# The last step of $MODEL_TAG with a complete checkpoint in FOLDER (default base_checkpoints), or -1 if none.
last_checkpoint_step() {
    python -c "import sys; from nanochat.checkpoint_manager import list_steps
steps = list_steps(sys.argv[1]); print(steps[-1] if steps else -1)" "$BASE_DIR/${1:-base_checkpoints}/$MODEL_TAG"
}

# resumable_stage NAME FOLDER DONE_FILE COMMAND...: a training stage (mid_train, chat_sft). Skipped once DONE_FILE
# (its report section, written when the run reaches its end) exists; a run stopped early (Ctrl-C and SIGTERM save a
# checkpoint) continues from the last checkpoint of $MODEL_TAG in FOLDER with --resume_from_step.
resumable_stage() {
    STAGE=$1; local folder=$2 done_file=$3; shift 3
    if [ -e "$done_file" ]; then
        echo "[skip] $STAGE: ${done_file#"$BASE_DIR"/} exists"
        return
    fi
    local last
    last=$(last_checkpoint_step "$folder")
    if [ "$last" -ge 0 ]; then
        echo "[run] $STAGE (resuming from step $last)"
        "$@" --resume_from_step="$last"
    else
        echo "[run] $STAGE"
        "$@"
    fi
    if [ ! -e "$done_file" ]; then
        echo "$PIPELINE_NAME: $STAGE stopped at step $(last_checkpoint_step "$folder") before its end;" \
            "run $PIPELINE_NAME again to resume it." >&2
        exit 1
    fi
}

# The closing lines of a pipeline: how to talk to the model of $MODEL_TAG it trained, from its latest
# phase that has a checkpoint (sft, else mid, else base), in the terminal and in the browser.
print_chat_commands() {
    local source=base prefix=""
    if [ -d "$BASE_DIR/mid_checkpoints/$MODEL_TAG" ]; then source=mid; fi
    if [ -d "$BASE_DIR/chatsft_checkpoints/$MODEL_TAG" ]; then source=sft; fi
    if [ -n "${NANOCHAT_BASE_DIR:-}" ]; then prefix="NANOCHAT_BASE_DIR=$BASE_DIR "; fi
    echo
    echo "Talk to your model (from $REPO_ROOT, after: source .venv/bin/activate):"
    echo "  ${prefix}python -m scripts.chat_cli -i $source -g $MODEL_TAG    # in the terminal"
    echo "  ${prefix}python -m scripts.chat_web -i $source -g $MODEL_TAG    # in the browser, at http://localhost:8000/"
    echo "(chat_web listens on this machine only; --host 0.0.0.0 lets other machines in, with no login.)"
}
