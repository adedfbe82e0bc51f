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
import shutil
import tempfile
import zipfile
from contextlib import nullcontext

from filelock import FileLock

from nanochat.common import download_file_with_lock, get_base_dir, print0, atomic_write

# What to evaluate
max_per_task = -1  # examples per task after the fixed shuffle (-1 = all); 50 gives a quick, noisy look
model_tag = ""  # checkpoint folder under base_checkpoints (empty = the largest model)
step = -1  # checkpoint step (-1 = the last one saved)
# Runtime
device_type = ""  # cuda|cpu|mps (empty = autodetect)

_DEFAULT_EVAL_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"


def unpack_bundle(zip_path):
    """
    Unzip into a temporary folder next to the destination, then rename it into place, so that
    <base>/eval_bundle either does not exist or is complete (an interrupted unzip leaves no half bundle).
    """
    base_dir = get_base_dir()
    bundle_dir = os.path.join(base_dir, "eval_bundle")
    tmp_dir = tempfile.mkdtemp(dir=base_dir, prefix="eval_bundle.", suffix=".tmp")
    try:
        with zipfile.ZipFile(zip_path, "r") as zf:
            zf.extractall(tmp_dir)
        # The published zip holds a top-level eval_bundle/ folder; accept a zip of its contents too.
        candidates = [os.path.join(tmp_dir, "eval_bundle"), tmp_dir]
        unpacked = next((c for c in candidates if os.path.exists(os.path.join(c, "core.yaml"))), None)
        if unpacked is None:
            raise ValueError(f"{zip_path} has no core.yaml (at its root or under eval_bundle/): not an eval bundle")
        os.rename(unpacked, bundle_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    print0(f"Unpacked the eval bundle to {bundle_dir}")


def ensure_eval_bundle():
    """Path of the unpacked eval bundle, downloading and unpacking it first if needed (once across ranks)."""
    bundle_dir = os.path.join(get_base_dir(), "eval_bundle")
    if os.path.isdir(bundle_dir):
        return bundle_dir
    url = os.environ.get("NANOCHAT_EVAL_BUNDLE_URL") or _DEFAULT_EVAL_BUNDLE_URL
    if os.path.exists(url):  # a plain local path
        url = "file://" + os.path.abspath(url)
    try:
        zip_path = download_file_with_lock(url, "eval_bundle.zip", postprocess_fn=unpack_bundle)
    except OSError as e:  # network down, 404, unreadable file:// path
        raise RuntimeError(f"could not download the CORE eval bundle from {url} ({e}). Point NANOCHAT_EVAL_BUNDLE_URL "
                           f"at a reachable copy (http(s):// or file://), or turn CORE off with --core_metric_every=-1") from None
    # The zip may be there from an earlier run whose unzip did not finish: unpack it now.
    with FileLock(zip_path + ".lock"):
        if not os.path.isdir(bundle_dir):
            unpack_bundle(zip_path)
    return bundle_dir


def format_results_csv(out):
    """The reference's CSV layout: padded Task, Accuracy, Centered columns, then the CORE line."""
    lines = [f"{'Task':<35}, {'Accuracy':<10}, {'Centered':<10}"]
    for label, accuracy in out["results"].items():
        lines.append(f"{label:<35}, {accuracy:<10.6f}, {out['centered_results'][label]:<10.6f}")
    lines.append(f"{'CORE':<35}, {'':<10}, {out['core_metric']:<10.6f}")
    return "\n".join(lines) + "\n"


def main():
    from nanochat.configurator import configure
    configure(globals(), __file__)

    import torch
    from nanochat.common import autodetect_device_type, compute_init, compute_cleanup
    from nanochat.checkpoint_manager import load_model
    from nanochat.core_eval import evaluate_core
    from nanochat.report import get_report

    device_kind = device_type or autodetect_device_type()
    ddp, rank, local_rank, world_size, device = compute_init(device_kind)
    autocast_ctx = torch.amp.autocast(device_type="cuda", dtype=torch.bfloat16) if device_kind == "cuda" else nullcontext()

    model, tokenizer, meta = load_model("base", device, phase="eval", model_tag=model_tag or None, step=None if step < 0 else step)
    model_step = meta["step"]
    model_name = f"base_model (step {model_step})"
    try:
        bundle_dir = ensure_eval_bundle()
    except RuntimeError as e:
        print0(f"error: {e}")
        compute_cleanup()
        raise SystemExit(1)
    print0(f"Evaluating {model_name} on {bundle_dir}" + (f", {max_per_task} examples per task" if max_per_task > 0 else ""))

    try:
        with autocast_ctx:
            out = evaluate_core(model, tokenizer, device, bundle_dir, max_per_task=max_per_task)
    except ValueError as e:
        print0(f"error: {e}")
        compute_cleanup()
        raise SystemExit(1)

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


if __name__ == "__main__":
    main()
