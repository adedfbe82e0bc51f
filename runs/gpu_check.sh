#!/usr/bin/env bash
# GPU check: the CUDA path end to end on one NVIDIA GPU in under 8 minutes, with one summary table at
# the end. Runs offline from local folders; nothing is downloaded.
#   1. the test suite's GPU-marked tests (KV cache, bf16 training step, compiled vs eager, Engine)
#   2. a short depth-20 pretraining run with torch.compile: compile time, steady tok/s, MFU, peak memory
#   3. the same run with the reference (REF_DIR=an unpacked copy of it), and the ratio of the two
#   4. base_eval on a few examples per CORE task, and one Engine generation (scripts.sample), on CUDA
#
#   bash runs/gpu_check.sh
#   GPU_CHECK_DRY=1 bash runs/gpu_check.sh     # the same stages on CPU at toy size: checks this script
#
# Inputs (environment):
#   GPU_CHECK_DATA        folder of shard_*.parquet, the last one the validation shard (default: shared/data/corpus,
#                         else ../shared/data/corpus)
#   GPU_CHECK_EVAL_BUNDLE eval_bundle.zip, a path or URL (default: shared/data/eval_bundle.zip, else ../shared/...)
#   GPU_CHECK_WHEELS      folder of wheels installed first with pip --no-index, those not installed already,
#                         into a private folder (default: .whl if it exists); e.g. rustbpe for training a
#                         tokenizer, and for the reference also tokenizers, jinja2, requests
#   GPU_CHECK_TOKENIZER   folder with tokenizer.pkl and token_bytes.pt to use (default: train one here, needs rustbpe)
#   REF_DIR               the reference checkout; its run is skipped when unset
#   GPU_CHECK_DEPTH (20), GPU_CHECK_BATCH (32 sequences of 2048 tokens per step), GPU_CHECK_STEPS (30)
#   GPU_CHECK_OUT         where summary.md and environment.txt go (default: a new folder under /tmp)
#   GPU_CHECK_BASE_DIR    where data, tokenizer, checkpoints and each stage's log go (default: a new folder under /tmp)
#   PYTHON                interpreter (default: .venv/bin/python if it exists, else python3)
set -uo pipefail  # no -e: a failing stage is recorded in the table and the next one still runs
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"
first_existing() { for p in "$@"; do if [ -e "$p" ]; then echo "$p"; return; fi; done; echo "$1"; }

DRY=${GPU_CHECK_DRY:-0}
if [ -x "$REPO_ROOT/.venv/bin/python" ]; then PYTHON=${PYTHON:-$REPO_ROOT/.venv/bin/python}
else PYTHON=${PYTHON:-python3}; fi
DATA=$(first_existing "${GPU_CHECK_DATA:-}" shared/data/corpus ../shared/data/corpus ../../shared/data/corpus)
BUNDLE=$(first_existing "${GPU_CHECK_EVAL_BUNDLE:-}" shared/data/eval_bundle.zip ../shared/data/eval_bundle.zip \
    ../../shared/data/eval_bundle.zip)
WHEELS=$(first_existing "${GPU_CHECK_WHEELS:-}" .whl)
OUT=${GPU_CHECK_OUT:-$(mktemp -d /tmp/gpu_check.XXXXXX)}
BASE=${GPU_CHECK_BASE_DIR:-$(mktemp -d /tmp/gpu_check_base.XXXXXX)}
mkdir -p "$OUT" "$BASE"
OUT=$(cd "$OUT" && pwd); BASE=$(cd "$BASE" && pwd)
if ! ls "$DATA"/shard_*.parquet >/dev/null 2>&1; then
    echo "gpu_check: no shard_*.parquet in '$DATA': set GPU_CHECK_DATA to a folder of them" \
        "(the last is the validation shard)" >&2
    exit 1
fi
DATA=$(cd "$DATA" && pwd)
case "$BUNDLE" in *://*) ;; *) BUNDLE=$(cd "$(dirname "$BUNDLE")" && pwd)/$(basename "$BUNDLE");; esac
if [ "$DRY" = 1 ]; then
    # toy sizes on CPU: every stage runs, in a few minutes on a laptop
    DEVICE=cpu; DEPTH=${GPU_CHECK_DEPTH:-2}; BATCH=${GPU_CHECK_BATCH:-2}; SEQ=256; STEPS=${GPU_CHECK_STEPS:-12}
    VOCAB=1024; TOK_CHARS=3000000; COMPILE=false; PER_TASK=11
else
    DEVICE=cuda; DEPTH=${GPU_CHECK_DEPTH:-20}; BATCH=${GPU_CHECK_BATCH:-32}; SEQ=2048; STEPS=${GPU_CHECK_STEPS:-30}
    VOCAB=65536; TOK_CHARS=30000000; COMPILE=true; PER_TASK=16  # CORE's 10-shot tasks need more than 10
fi
export NANOCHAT_BASE_DIR="$BASE" OMP_NUM_THREADS=${OMP_NUM_THREADS:-8} PYTHONUNBUFFERED=1
export NANOCHAT_EVAL_BUNDLE_URL="$BUNDLE" NANOCHAT_DATA_URL="file://$DATA"
LOGS="$BASE/gpu_check_logs"; mkdir -p "$LOGS"
RESULTS="$LOGS/results.tsv"  # stage, status, seconds, log file
: > "$RESULTS"

# stage NAME LIMIT_SECONDS COMMAND...: runs it with a time limit, its output shown and kept in $LOGS/<name>.log
stage() {
    local name=$1 limit=$2; shift 2
    local log="$LOGS/${name//[^a-zA-Z0-9]/_}.log" start=$SECONDS status=ok code
    echo "=== $name (limit ${limit}s)"
    timeout --kill-after=20 "$limit" "$@" 2>&1 | tee "$log"
    code=${PIPESTATUS[0]}
    if [ "$code" = 124 ] || [ "$code" = 137 ]; then status="TIMEOUT after ${limit}s"
    elif [ "$code" != 0 ]; then status="FAILED (exit $code)"; fi
    printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - start))" "$log" >> "$RESULTS"
    [ "$status" = ok ]
}

echo "gpu_check: logs in $OUT, data/checkpoints in $BASE"
{
    echo "python: $PYTHON ($("$PYTHON" -c 'import sys; print(sys.version.split()[0])'))"
    "$PYTHON" -c "import torch
print(f'torch {torch.__version__}, CUDA build {torch.version.cuda}, cuda available: {torch.cuda.is_available()}')
print('device:', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')"
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    # can speedrun.sh give the workers time to save when stopped? (TORCH_ELASTIC_SHUTDOWN_TIMEOUT)
    "$PYTHON" -m torch.distributed.run --help 2>/dev/null | grep -q -- "--shutdown-timeout" \
        && echo "torchrun: --shutdown-timeout supported" \
        || echo "torchrun: no --shutdown-timeout (workers get 30 s after a stop)"
} | tee "$OUT/environment.txt"

# Wheels: only the distributions this interpreter lacks, into a private folder put on PYTHONPATH
SITE="$BASE/site"
if [ -d "$WHEELS" ]; then
    missing=$("$PYTHON" - "$WHEELS" <<'EOF'
import sys, os, re
from importlib import metadata
for name in sorted(os.listdir(sys.argv[1])):
    if not name.endswith(".whl"):
        continue
    dist = name.split("-")[0]
    try:
        metadata.version(dist)
    except metadata.PackageNotFoundError:
        print(os.path.join(sys.argv[1], name))
EOF
)
    if [ -n "$missing" ]; then
        # a wheel is a zip laid out for site-packages: without pip, unpacking it there works as well
        install_wheels() {
            "$PYTHON" -m pip install --quiet --no-index --no-deps --target "$SITE" "$@" && return
            echo "pip failed or is missing: unpacking the wheels into $SITE instead"
            for wheel in "$@"; do "$PYTHON" -m zipfile -e "$wheel" "$SITE" || return; done
        }
        export -f install_wheels; export PYTHON SITE  # for the bash that `timeout` starts
        # shellcheck disable=SC2086
        stage "wheels" 120 bash -c 'install_wheels "$@"' install_wheels $missing
    fi
fi
export PYTHONPATH="$SITE:$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"

# 1. GPU-marked tests (they skip only where CUDA is absent); only the files that have some, so that a test
#    module needing a package this machine lacks (the web UI's, say) is not even imported
mapfile -t GPU_TEST_FILES < <(grep -l "pytest.mark.gpu" tests/test_*.py)
stage "gpu tests" 240 "$PYTHON" -m pytest -q -rs -m gpu -p no:cacheprovider "${GPU_TEST_FILES[@]}"

# Data and tokenizer for the runs below
NUM_SHARDS=$(find "$DATA" -maxdepth 1 -name 'shard_*.parquet' | wc -l)
export NANOCHAT_DATA_MAX_SHARD=$((NUM_SHARDS - 1))
stage "data" 120 "$PYTHON" -m nanochat.dataset -n "$NANOCHAT_DATA_MAX_SHARD"
if [ -n "${GPU_CHECK_TOKENIZER:-}" ]; then
    mkdir -p "$BASE/tokenizer" && cp "$GPU_CHECK_TOKENIZER"/* "$BASE/tokenizer/"
    echo "tokenizer: copied from $GPU_CHECK_TOKENIZER"
elif [ ! -e "$BASE/tokenizer/token_bytes.pt" ]; then
    stage "tokenizer" 300 "$PYTHON" -m scripts.tok_train --max_chars="$TOK_CHARS" --vocab_size="$VOCAB"
fi

# 2. and 3. the same short pretraining run, ours then the reference's
train_args() {  # the settings both runs share
    echo --depth="$DEPTH" --max_seq_len="$SEQ" --device_batch_size="$BATCH" --total_batch_size=$((BATCH * SEQ)) \
        --num_iterations="$STEPS" --core_metric_every=-1 --device_type="$DEVICE"
}
# shellcheck disable=SC2046
train_ours() { stage "ours base_train" 420 "$PYTHON" -m scripts.base_train $(train_args) --model_tag=gpucheck \
    --compile="$COMPILE" --eval_every=-1 --sample_every=-1 --save_every=-1; }
if ! train_ours && grep -q "out of memory" "$LOGS/ours_base_train.log"; then
    BATCH=$((BATCH / 2))
    echo "out of memory: again with --device_batch_size=$BATCH"
    train_ours
fi
if [ -n "${REF_DIR:-}" ]; then
    REF_DIR=$(cd "$REF_DIR" && pwd)
    # The reference imports wandb at the top even for run=dummy: a stand-in where wandb is not installed.
    STUBS="$BASE/ref_stubs"; mkdir -p "$STUBS"
    "$PYTHON" -c "import wandb" 2>/dev/null \
        || echo "def init(*a, **k): raise RuntimeError('wandb is a stand-in here')" > "$STUBS/wandb.py"
    # it evaluates val bpb at the first and last step (one batch each) and saves at the end; no CORE
    # shellcheck disable=SC2046
    stage "reference base_train" 420 env PYTHONPATH="$SITE:$REF_DIR:$STUBS" bash -c 'cd "$0" && exec "$@"' "$REF_DIR" \
        "$PYTHON" -m scripts.base_train $(train_args) --model_tag=gpucheck_ref --eval_every=100000 \
        --eval_tokens=$((BATCH * SEQ)) --sample_every=100000
fi

# 4. evaluation and generation on the checkpoint just trained
stage "base_eval" 240 "$PYTHON" -m scripts.base_eval --model_tag=gpucheck --max_per_task="$PER_TASK" \
    --device_type="$DEVICE"
stage "sample" 120 "$PYTHON" -m scripts.sample --model_tag=gpucheck --prompt="The capital of France is" \
    --num_samples=2 --max_tokens=32 --temperature=0 --device_type="$DEVICE"

# Summary: one table, also written to $OUT/summary.md
"$PYTHON" - "$RESULTS" "$OUT/summary.md" "$DEPTH" "$BATCH" "$SEQ" "$STEPS" <<'EOF'
import re, statistics, sys
results_path, summary_path, depth, batch, seq, steps = sys.argv[1:]
rows = [line.rstrip("\n").split("\t") for line in open(results_path) if line.strip()]
last = {name: (status, seconds, log) for name, status, seconds, log in rows}  # a retried stage: its last try

def training_numbers(log):
    text = open(log, errors="replace").read()
    found = [(int(s), float(dt), int(tok.replace(",", "")), float(mfu)) for s, dt, tok, mfu in
             re.findall(r"step (\d+)/\d+ .*?dt: ([\d.]+)ms \| tok/sec: ([\d,]+) \| mfu: ([\d.]+)", text)]
    if not found:
        return None
    steady = [f for f in found if f[0] >= max(3, len(found) // 3)] or found
    dt = statistics.median(f[1] for f in steady)
    memory = re.findall(r"Peak memory usage: ([\d.]+)MiB", text)
    return {"first_step_s": found[0][1] / 1000, "compile_s": max(0.0, (found[0][1] - dt) / 1000),
            "tok_s": statistics.median(f[2] for f in steady), "mfu": statistics.median(f[3] for f in steady),
            "peak_mib": float(memory[-1]) if memory else None, "steps": len(found)}

lines = [f"| stage | status | seconds | result |", "| --- | --- | --- | --- |"]
numbers = {}
for name, (status, seconds, log) in last.items():
    result = ""
    text = open(log, errors="replace").read()
    if name.endswith(" base_train"):
        n = training_numbers(log)
        if n:
            numbers[name] = n
            memory = f"{n['peak_mib']:,.0f} MiB" if n["peak_mib"] else "n/a"
            result = (f"d{depth}, {batch}x{seq} tokens/step, {n['steps']} steps: compile ~{n['compile_s']:.1f}s "
                      f"(first step {n['first_step_s']:.1f}s), steady {n['tok_s']:,.0f} tok/s, "
                      f"MFU {n['mfu']:.1f}%, peak {memory}")
    elif name == "gpu tests":
        m = re.findall(r"(\d+ (?:passed|failed|skipped|error)[^\n]*) in [\d.]+s", text)
        result = m[-1] if m else ""
    elif name == "base_eval":
        m = re.search(r"^CORE\s*,\s*,\s*([-\d.]+)", text, re.M)
        result = f"CORE {float(m.group(1)):.4f} on the first examples of each task" if m else ""
    elif name == "sample":
        m = re.findall(r"The capital of France is[^\n]*", text)
        result = repr(m[-1][:90]) if m else ""
    if status != "ok":
        tail = [l for l in text.strip().splitlines() if l.strip()][-1:]
        result = "; ".join(x for x in (result, f"last line: {tail[0][:150]}" if tail else "") if x)
    lines.append(f"| {name} | {status} | {seconds} | {result} |")
if "ours base_train" in numbers and "reference base_train" in numbers:
    ours, ref = numbers["ours base_train"], numbers["reference base_train"]
    memory = (f", peak memory ratio {ours['peak_mib'] / ref['peak_mib']:.3f}"
              if ours["peak_mib"] and ref["peak_mib"] else "")
    lines.append(f"| ours / reference | | | tok/s ratio {ours['tok_s'] / ref['tok_s']:.3f}, "
                 f"compile {ours['compile_s']:.1f}s vs {ref['compile_s']:.1f}s{memory} |")
summary = "\n".join(lines)
open(summary_path, "w").write(summary + "\n")
print("\n" + summary)
EOF
echo "gpu_check: logs and summary.md in $OUT"
! grep -qv $'\tok\t' "$RESULTS"  # exit status: 0 only if every stage passed
