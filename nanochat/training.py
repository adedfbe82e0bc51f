"""
What the training scripts (base_train, mid_train, chat_sft, chat_rl) share besides the model and optimizers:
the pieces that make a run stoppable and exactly resumable.

- random-number state in and out of a checkpoint's meta file (JSON-safe);
- a step log (<checkpoint dir>/log.jsonl) that a resumed run truncates back to its step;
- Ctrl-C / SIGTERM turned into a request the loop acts on between steps;
- warnings for settings that changed since the run being resumed;
- the choices a run makes by measuring the machine, saved with it and made alike by a resumed run;
- Muon's momentum warm-up, the same in every phase;
- one optimization step's shared ends: stopping before a loss of inf/nan reaches the weights, and the
  learning rates set from the schedule's multiplier.
"""

import base64
import json
import os
import random
import signal
import time

import torch
import torch.distributed as dist

from nanochat import hardware
from nanochat.checkpoint_manager import list_steps, load_checkpoint
from nanochat.common import atomic_write, fail, print0


def _encode_tensor_state(state):
    return base64.b64encode(state.cpu().numpy().tobytes()).decode("ascii")


def _decode_tensor_state(text):
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def capture_rng_state(device):
    """Python's and torch's generators (and CUDA's on a CUDA device) as a JSON-safe dict."""
    rng = {"python": list(random.getstate()), "torch": _encode_tensor_state(torch.get_rng_state())}
    if torch.device(device).type == "cuda":
        rng["cuda"] = _encode_tensor_state(torch.cuda.get_rng_state(device))
    return rng


def restore_rng_state(rng, device):
    """The inverse of capture_rng_state (missing entries are left alone)."""
    if "python" in rng:
        random.setstate((rng["python"][0], tuple(rng["python"][1]), rng["python"][2]))
    if "torch" in rng:
        torch.set_rng_state(_decode_tensor_state(rng["torch"]))
    if rng.get("cuda") and torch.device(device).type == "cuda":
        torch.cuda.set_rng_state(_decode_tensor_state(rng["cuda"]), device)


def warn_changed_settings(saved_config, user_config, harmless):
    """Warn about each setting that differs from the run being resumed and changes the optimisation."""
    for name, now in user_config.items():
        if name in saved_config and name not in harmless and saved_config[name] != now:
            print0(f"warning: {name} was {saved_config[name]!r} in the run being resumed and is {now!r} now: "
                   "the continuation will differ")


class StepLog:
    """
    One JSON line per training step and per evaluation in `path`. A run resumed at `resume_step` first
    drops the lines of steps >= resume_step (they belong to the stretch being redone). Only the
    process with `enabled` (rank 0) writes.
    """

    def __init__(self, path, resume_step=None, enabled=True):
        self.file = None
        if not enabled:
            return
        kept = []
        if resume_step is not None and os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                for line in f:
                    try:
                        if json.loads(line)["step"] < resume_step:
                            kept.append(line if line.endswith("\n") else line + "\n")
                    except (json.JSONDecodeError, KeyError, TypeError):
                        pass  # a line cut short by a crash
        atomic_write(path, lambda f: f.writelines(kept), mode="w")
        self.file = open(path, "a", encoding="utf-8")

    def log(self, record):
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self):
        if self.file is not None:
            self.file.close()
            self.file = None


class StopRequest:
    """
    Ctrl-C / SIGTERM set .requested instead of killing the process; the training loop finishes its step
    (or the evaluation task in progress), saves and exits. A second signal more than a few seconds after
    the first stops at once. One that comes sooner is taken for the first one passed on by a launcher:
    under torchrun a Ctrl-C reaches the workers from the terminal and then again from torchrun.
    """

    ECHO_SECONDS = 3.0

    def __init__(self):
        self.requested = False
        self.first_signal_time = None
        signal.signal(signal.SIGINT, self._handle)
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        now = time.monotonic()
        if self.first_signal_time is None:
            self.requested = True  # acted on between steps (printing here could interrupt another print)
            self.first_signal_time = now
        elif now - self.first_signal_time > self.ECHO_SECONDS:
            signal.signal(signum, signal.SIG_DFL)  # asked twice: stop now
            os.kill(os.getpid(), signum)

    def anywhere(self, device):
        """
        Whether any rank was asked to stop. A collective under torchrun: every rank must call it at the same
        point (before an evaluation, between its tasks), so that all of them stop there together.
        """
        flag = torch.tensor(float(self.requested), device=device)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag)
        return flag.item() > 0


def saved_machine_choices(meta_data):
    """The machine choices (see machine_choices) of the run being resumed; {} when starting fresh (meta_data None)."""
    if meta_data is None:
        return {}
    loop_state = meta_data["loop_state"]
    return loop_state.get("machine_choices", loop_state.get("precision", {}))  # "precision": older checkpoints


def machine_choices(use_bf16, muon_optimizer, use_compile=False):
    """
    What a training run chose by measuring or looking at the machine, each of which changes the numbers: bf16
    autocast, Muon's Newton-Schulz dtype, torch.compile, and the CPU thread count (on MKL's Intel code paths the
    count changes the last bits of fp32 matmuls). Saved in every checkpoint; a resumed run makes the same choices
    (the functions below), so it continues exactly even where measuring again would choose otherwise: a
    borderline timing, a busy machine, another machine.
    """
    return {"autocast": "bfloat16" if use_bf16 else "float32",
            "newton_schulz": str(muon_optimizer.ns_dtype).removeprefix("torch."),
            "compile": use_compile,
            "threads": torch.get_num_threads()}


def use_bf16_autocast(dtype, saved, device):
    """Train under bf16 autocast? dtype is the script's setting (auto|float32|bfloat16); with auto a resumed run
    keeps its choice, a new one measures (CUDA, CPUs with fast native bf16)."""
    if dtype == "auto" and "autocast" in saved:
        return saved["autocast"] == "bfloat16"
    if dtype == "auto":
        return hardware.choose_autocast_dtype(device) == torch.bfloat16
    return dtype == "bfloat16"


def use_torch_compile(compile, saved, device, eager_seconds_estimate, shapes=1):
    """
    torch.compile the training model? compile is the script's setting (auto|true|false); with auto a resumed run
    keeps its choice, a new one compiles on CUDA, and on CPU when eager training would take over 30 s per input
    shape it compiles for (eager_seconds_estimate, from the measured matmul peak): compiling costs 5-20 s there
    and saves ~40% of each step (measured at depth 4, seq 512).
    """
    if compile == "auto" and "compile" in saved:
        return saved["compile"]
    if compile == "auto":
        device_type = torch.device(device).type
        return device_type == "cuda" or (device_type == "cpu" and eager_seconds_estimate > 30 * shapes)
    return compile == "true"


def reuse_newton_schulz_dtype(muon_optimizer, saved):
    """A resumed run orthogonalises in the dtype of the run it continues (Muon measures the device otherwise)."""
    if "newton_schulz" in saved:
        muon_optimizer.ns_dtype = getattr(torch, saved["newton_schulz"])


def finetuning_optimizers(model, init_lr_frac, saved, resume=None, **rates):
    """
    The optimizers of a stage that starts from a trained model (mid, SFT, RL): the model's own AdamW and Muon at
    init_lr_frac of the given rates (initial_lr too: the stage's schedule multiplies it), Muon orthogonalising
    as the resumed run did. resume = (checkpoint_dir, step, device, rank) loads their saved state.
    """
    optimizers = model.setup_optimizers(**rates)
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] = group["lr"] * init_lr_frac
    reuse_newton_schulz_dtype(optimizers[1], saved)
    if resume is not None:
        checkpoint_dir, step, device, rank = resume
        _, optimizer_data, _ = load_checkpoint(checkpoint_dir, step, device, load_optimizer=True, rank=rank)
        for opt, state in zip(optimizers, optimizer_data):
            opt.load_state_dict(state)
    return optimizers


def reuse_thread_count(saved, device):
    """
    A resumed CPU run computes with the thread count of the run it continues (OMP_NUM_THREADS or the number of
    cores may differ now). If this machine has fewer CPUs than that, it keeps its own count and says that the
    continuation may differ in the last digits.
    """
    threads, now = saved.get("threads"), torch.get_num_threads()
    if threads is None or torch.device(device).type != "cpu" or threads == now:
        return
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if threads > cpus:
        print0(f"warning: the run being resumed computed with {threads} CPU threads, more than the {cpus} CPUs "
               f"available here: continuing with {now}, so the numbers may differ in the last digits")
        return
    print0(f"CPU threads: {threads}, as in the run being resumed (instead of {now}): the same numbers")
    torch.set_num_threads(threads)


def muon_momentum(step):
    """Muon's momentum ramps 0.85 -> 0.95 over the first 300 steps (as in the reference)."""
    frac = min(step / 300, 1)
    return (1 - frac) * 0.85 + frac * 0.95


def stop_on_nonfinite_loss(loss_name, step, checkpoint_dir, advice=""):
    """
    End the run before a loss of inf/nan updates the weights, naming the checkpoint to continue from. Called
    once the flag is summed over ranks, so every rank stops alike and rank 0 alone says why.
    """
    saved = list_steps(checkpoint_dir)
    last_good = (f"the last good checkpoint is step {saved[-1]} in {checkpoint_dir} "
                 f"(continue with --resume_from_step={saved[-1]})" if saved else "no checkpoint was saved before it")
    fail(f"the {loss_name} became nan/inf at step {step}; stopped before updating the weights: {last_good}{advice}",
         every_rank_agrees=True)


def set_learning_rates(optimizers, multiplier):
    """Every group's learning rate at this step: the rate it was built with, scaled by the schedule."""
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * multiplier
