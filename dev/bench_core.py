"""
CORE evaluation speed: our evaluate_task (examples batched, logits at the scored positions only)
against the reference nanochat's (one example per forward pass) on the same weights and bundle, task
by task in one process, taking turns (which one goes first alternates), so that load from other
processes hits both alike. Accuracies must come out equal; the script says where they do not.

    python -m dev.bench_core --ref_dir=/path/to/reference/nanochat --max_per_task=40
    python -m dev.bench_core --ref_dir= --max_per_task=-1          # ours only, the whole bundle
    python -m dev.bench_core --device_type=cuda --ref_dir=...       # under bf16 autocast, as base_eval runs there

The model is a base checkpoint from $NANOCHAT_BASE_DIR (the largest, or --model_tag); the bundle is
<base>/eval_bundle, fetched from NANOCHAT_EVAL_BUNDLE_URL if missing (see nanochat/core_eval.py).
"""

import os
import time
from contextlib import nullcontext

import torch

from dev.reference import load_reference, reference_model
from nanochat.checkpoint_manager import load_model
from nanochat.common import autodetect_device_type
from nanochat.configurator import configure
from nanochat.core_eval import ensure_eval_bundle, evaluate_task, load_bundle, load_task_data

# -----------------------------------------------------------------------------
# Settings (--name=value on the command line; --help prints this block)

model_tag = ""  # checkpoint folder under base_checkpoints ("" = the largest model)
step = -1  # checkpoint step (-1 = the last one saved)
max_per_task = 40  # examples per task after the fixed shuffle (-1 = all)
tasks = ""  # comma-separated task labels to time ("" = every task of the bundle)
ref_dir = os.environ.get("REF_DIR", "")  # a checkout of the reference nanochat (f37d45c); "" = ours only
device_type = ""  # cuda|cpu|mps (empty = autodetect)
threads = 0  # torch CPU threads (0 = torch's default)
configure(globals(), __file__)
# -----------------------------------------------------------------------------


def main():
    if threads > 0:
        torch.set_num_threads(threads)
    device = torch.device(device_type or autodetect_device_type())
    model, tokenizer, meta = load_model("base", device, phase="eval", model_tag=model_tag or None,
                                        step=None if step < 0 else step)
    autocast = torch.amp.autocast(device_type="cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    contenders = {"ours": lambda data, task_meta: evaluate_task(model, tokenizer, data, device, task_meta)}
    if ref_dir:
        ref_gpt, ref_core = load_reference(ref_dir, "gpt", "core_eval")
        ref_model = reference_model(ref_gpt, model)
        contenders["reference"] = lambda data, task_meta: ref_core.evaluate_task(ref_model, tokenizer, data, device,
                                                                                 task_meta)
    bundle_tasks, _ = load_bundle(ensure_eval_bundle())
    wanted = set(tasks.split(",")) if tasks else None
    print(f"Model: step {meta['step']}, depth {model.config.n_layer}, on {device}"
          f"{' (bf16 autocast)' if device.type == 'cuda' else ' (fp32)'}, torch threads {torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.1f}; {max_per_task} examples per task")
    names = list(contenders)
    print(f"{'task':<34} {'n':>5} " + " ".join(f"{name + ' s':>12}" for name in names)
          + (f" {'speedup':>8}  accuracies" if ref_dir else "  accuracy"))
    totals = {name: 0.0 for name in names}
    mismatches = []
    for i, task in enumerate(bundle_tasks):
        if (wanted and task["label"] not in wanted) or not os.path.exists(task["path"]):
            continue
        data = load_task_data(task["path"], max_per_task)
        seconds, accuracy = {}, {}
        for name in (names if i % 2 == 0 else names[::-1]):  # take turns going first
            t0 = time.perf_counter()
            with autocast:
                accuracy[name] = contenders[name](data, task["task_meta"])
            seconds[name] = time.perf_counter() - t0
            totals[name] += seconds[name]
        line = f"{task['label']:<34} {len(data):>5} " + " ".join(f"{seconds[name]:>12.1f}" for name in names)
        if ref_dir:
            same = accuracy["ours"] == accuracy["reference"]
            if not same:
                mismatches.append(task["label"])
            line += (f" {seconds['reference'] / seconds['ours']:>7.2f}x  {accuracy['ours']:.4f}"
                     + (" (same)" if same else f" vs reference {accuracy['reference']:.4f}"))
        else:
            line += f"  {accuracy['ours']:.4f}"
        print(line, flush=True)
    line = f"{'total':<34} {'':>5} " + " ".join(f"{totals[name]:>12.1f}" for name in names)
    if ref_dir:
        line += f" {totals['reference'] / totals['ours']:>7.2f}x  " + (
            "all accuracies equal" if not mismatches else f"accuracies differ: {', '.join(mismatches)}")
    print(line)


if __name__ == "__main__":
    main()
