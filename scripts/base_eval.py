"""
CORE metric of a base model checkpoint (see nanochat/core_eval.py for what is measured).

    python -m scripts.base_eval                       # newest checkpoint of the largest model, all examples
    python -m scripts.base_eval --max_per_task=50     # quick look: first 50 (shuffled) examples of each task
    torchrun --nproc_per_node=8 -m scripts.base_eval  # examples split over ranks

The eval bundle (~160 MB) is downloaded once to <base>/eval_bundle from NANOCHAT_EVAL_BUNDLE_URL
(http(s)://, file:// or a local path) or, by default, from the reference's public bucket.
Writes <base>/base_eval/base_model_<step>.csv and a section of the report.
"""

import os
from contextlib import nullcontext

import torch

from nanochat.common import autodetect_device_type, compute_init, compute_cleanup, fail, get_base_dir, print0, atomic_write
from nanochat.configurator import configure
from nanochat.checkpoint_manager import load_model
from nanochat.core_eval import ensure_eval_bundle, evaluate_core, format_results_csv
from nanochat.report import get_report

# -----------------------------------------------------------------------------
# Settings (--name=value on the command line; --help prints this block)

# What to evaluate
max_per_task = -1  # examples per task after the fixed shuffle (-1 = all); 50 gives a quick, noisy look
model_tag = ""  # checkpoint folder under base_checkpoints (empty = the largest model)
step = -1  # checkpoint step (-1 = the last one saved)
# Runtime
device_type = ""  # cuda|cpu|mps (empty = autodetect)
configure(globals(), __file__)
# -----------------------------------------------------------------------------

device_kind = device_type or autodetect_device_type()
ddp, rank, local_rank, world_size, device = compute_init(device_kind)
autocast_ctx = torch.amp.autocast(device_type="cuda", dtype=torch.bfloat16) if device_kind == "cuda" else nullcontext()

model, tokenizer, meta = load_model("base", device, phase="eval", model_tag=model_tag or None,
                                    step=None if step < 0 else step)
model_step = meta["step"]
model_name = f"base_model (step {model_step})"
try:
    bundle_dir = ensure_eval_bundle()
except RuntimeError as e:
    fail(str(e))
print0(f"Evaluating {model_name} on {bundle_dir}" + (f", {max_per_task} examples per task" if max_per_task > 0 else ""))

try:
    with autocast_ctx:
        out = evaluate_core(model, tokenizer, device, bundle_dir, max_per_task=max_per_task)
except ValueError as e:
    fail(str(e))

if rank == 0:
    csv_text = format_results_csv(out)
    csv_path = os.path.join(get_base_dir(), "base_eval", f"base_model_{model_step:06d}.csv")
    atomic_write(csv_path, lambda f: f.write(csv_text.encode("utf-8")))
    print("=" * 80)
    print(f"Model: {model_name}")
    print("=" * 80)
    print(csv_text, end="")
    print(f"Total time: {sum(out['times'].values()):.1f}s; written to {csv_path}")
    for label, reason in out["skipped"].items():
        print(f"Not evaluated: {label} ({reason})")

summary = {"Model": model_name, "CORE metric": out["core_metric"]}
if max_per_task > 0:
    summary["Examples per task"] = max_per_task
if out["skipped"]:
    summary["Tasks skipped"] = ", ".join(out["skipped"])
get_report().log(section="Base model evaluation", data=[summary, out["centered_results"]])
compute_cleanup()
