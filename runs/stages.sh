# Sourced by the pipeline scripts (runs/runcpu.sh, speedrun.sh) after setup_env.sh, with the script's
# name as argument: sets BASE_DIR, names the failing stage on error, and defines `stage`.
PIPELINE_NAME=$1
STAGE="setup"
trap 'echo "$PIPELINE_NAME: stage \"$STAGE\" failed (see the messages above). Fix it and re-run: finished stages are skipped." >&2' ERR
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
