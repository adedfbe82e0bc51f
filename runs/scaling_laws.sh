#!/usr/bin/env bash
# Presets of scripts/scaling_laws.py: an iso-FLOP sweep (how big a model for a compute budget, and how many
# tokens), then a miniseries of depths at the tokens:params ratio the sweep found.
#
#   bash runs/scaling_laws.sh cpu                  # the sweep on a laptop CPU (see below for the time)
#   bash runs/scaling_laws.sh cpu_miniseries       # then depths 1-2 at its ratio, with CORE
#   bash runs/scaling_laws.sh gpu                  # upstream nanochat's grid on an 8-GPU node
#   bash runs/scaling_laws.sh gpu_miniseries       # then depths 12-26 at its ratio
#   bash runs/scaling_laws.sh gpu --shard=0/4      # more settings go to scripts.scaling_laws: here machine 0
#                                                  # of 4 sharing one NANOCHAT_BASE_DIR; then, once all are done:
#   bash runs/scaling_laws.sh gpu --train=false    # collect every finished point and analyse them
#
# Fully offline on a CPU (data and CORE bundle from ../shared, see ../shared/README.md):
#   NANOCHAT_DATA_URL=file://$PWD/../shared/data/corpus NANOCHAT_DATA_MAX_SHARD=10 \
#   NANOCHAT_EVAL_BUNDLE_URL=file://$PWD/../shared/data/eval_bundle.zip bash runs/scaling_laws.sh cpu
#
# Re-running skips finished points and resumes a stopped one (Ctrl-C saves it). Results: results.csv,
# fit.json and plots in <base>/scaling_laws/<preset>/, and the report sections "Scaling laws" and
# "Miniseries" in <base>/report/.
set -Eeuo pipefail
PRESET=${1:-}
shift || true
if [[ ! "$PRESET" =~ ^(cpu|cpu_miniseries|gpu|gpu_miniseries)$ ]]; then
    echo "usage: bash runs/scaling_laws.sh cpu|cpu_miniseries|gpu|gpu_miniseries [--setting=value ...]" >&2
    exit 2
fi
source "$(dirname "$0")/setup_env.sh"  # creates .venv on first use, then activates it
cd "$REPO_ROOT"

case "$PRESET" in
cpu|cpu_miniseries)
    # Its own base dir: the sweep wants a far smaller vocabulary (512) than runcpu.sh's tokenizer, so that
    # depths 1-3 (82k, 458k, 1.4M parameters without the embedding) bracket the optimum at CPU-sized budgets.
    # Measured on the local corpus (val bpb of depths 1/2/3): at 3e12 FLOPs depth 1 is best (2.38/2.46/2.72),
    # the optimum lies below the smallest model; at 1e13 and 3e13 depth 2 is (2.31/2.29/2.35, 2.26/2.12/2.17).
    # Depth 4 gives each budget a fourth point, so that a fit with any one depth left out exists (the spread).
    # 1.6e14 FLOPs in all, about 40 minutes on 2 cores (depth 1 runs at the lowest FLOP/s).
    export NANOCHAT_BASE_DIR=${NANOCHAT_SCALING_CPU_BASE_DIR:-${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}/scaling_cpu}
    export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}  # waiting threads sleep: much faster on a busy machine
    SHARDS=10  # the whole of a small corpus (NANOCHAT_DATA_MAX_SHARD=10), or 10 FineWeb-Edu shards
    python -m nanochat.dataset -n "$SHARDS"
    if [ ! -e "$NANOCHAT_BASE_DIR/tokenizer/token_bytes.pt" ]; then
        python -m scripts.tok_train --max_chars=30000000 --vocab_size=512
    fi
    CPU_SETTINGS=(--label=cpu --device_type=cpu --max_seq_len=128 --device_batch_size=16 --total_batch_size=2048
                  --eval_tokens=32768 --save_every_minutes=5)
    if [ "$PRESET" = cpu ]; then
        python -m scripts.scaling_laws "${CPU_SETTINGS[@]}" --budgets=1e13,3e13 --depths=1,2,3,4 \
            --core_metric=false "$@"
    else  # at ~20 tokens per parameter depth 3 alone would take 2e14 FLOPs: depths 1 and 2 only
        python -m scripts.scaling_laws "${CPU_SETTINGS[@]}" --miniseries --depths=1,2 \
            --core_metric_max_per_task=100 "$@"
    fi
    ;;
gpu|gpu_miniseries)
    export OMP_NUM_THREADS=1  # one process per GPU: keep their CPU threads from fighting
    # seconds torchrun gives the workers to save after Ctrl-C/SIGTERM before it kills them (its default: 30)
    export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-300}
    # The longest run, depth 10 at 1e19 FLOPs, trains on ~14B tokens: ~270 FineWeb-Edu shards (~52M tokens each).
    python -m nanochat.dataset -n 300
    BASE_DIR=$(python -c "from nanochat.common import get_base_dir; print(get_base_dir())")
    if [ ! -e "$BASE_DIR/tokenizer/token_bytes.pt" ]; then
        python -m scripts.tok_train --max_chars=2000000000 --vocab_size=65536  # the speedrun's tokenizer
    fi
    GPU_SETTINGS=(--label=gpu --device_type=cuda --nproc_per_node="${NPROC_PER_NODE:-8}" --max_seq_len=2048
                  --total_batch_size=524288 --eval_tokens=$((100 * 524288)) --core_metric_max_per_task=-1
                  --save_every_minutes=30 --run="${WANDB_RUN:-dummy}")
    if [ "$PRESET" = gpu ]; then
        python -m scripts.scaling_laws "${GPU_SETTINGS[@]}" --budgets=1e18,2.15e18,4.64e18,1e19 \
            --depths=10,12,14,16,18,20 --device_batch_size=32 "$@"
    else  # 16 sequences per pass, as upstream from depth 20 on: the deeper, wider models need the memory
        python -m scripts.scaling_laws "${GPU_SETTINGS[@]}" --miniseries --depths=12,14,16,18,20,22,24,26 \
            --device_batch_size=16 "$@"
    fi
    ;;
esac
