"""
Saving and loading training checkpoints, in the reference's layout:

    <base>/base_checkpoints/<model_tag>/model_{step:06d}.pt          model state_dict (rank 0)
    <base>/base_checkpoints/<model_tag>/optim_{step:06d}_rank{r}.pt  each rank's optimizer states (sharded)
    <base>/base_checkpoints/<model_tag>/meta_{step:06d}.json         step, configs, data and loop state

Every file goes through a temporary neighbour and a rename, so an interrupted save never
leaves a half-written checkpoint behind. The meta file is written last: a step counts as
saved once its meta file exists.
"""

import glob
import json
import os
import re

import torch

from nanochat.common import atomic_write, get_base_dir, print0

# source name -> folder under the base dir (the later training phases write their own)
CHECKPOINT_FOLDERS = {
    "base": "base_checkpoints",
    "mid": "mid_checkpoints",
    "sft": "chatsft_checkpoints",
    "rl": "chatrl_checkpoints",
}
# what produces each kind of checkpoint, for the error when none is found
TRAINING_COMMANDS = {
    "base": "python -m scripts.base_train",
    "mid": "python -m scripts.mid_train",
    "sft": "python -m scripts.chat_sft",
    "rl": "python -m scripts.chat_rl",
}


def save_checkpoint(checkpoint_dir, step, model_data, optimizer_data, meta_data, rank=0):
    """Rank 0 writes the model and meta; every rank writes its own optimizer shard."""
    os.makedirs(checkpoint_dir, exist_ok=True)
    if optimizer_data is not None:
        optimizer_path = os.path.join(checkpoint_dir, f"optim_{step:06d}_rank{rank:d}.pt")
        atomic_write(optimizer_path, lambda f: torch.save(optimizer_data, f))
    if rank == 0:
        model_path = os.path.join(checkpoint_dir, f"model_{step:06d}.pt")
        atomic_write(model_path, lambda f: torch.save(model_data, f))
        meta_path = os.path.join(checkpoint_dir, f"meta_{step:06d}.json")
        atomic_write(meta_path, lambda f: json.dump(meta_data, f, indent=2), mode="w")
        print0(f"Saved checkpoint of step {step} to {checkpoint_dir}")


def load_checkpoint(checkpoint_dir, step, device, load_optimizer=False, rank=0):
    """Returns (model_data, optimizer_data or None, meta_data) of one step."""
    model_path = os.path.join(checkpoint_dir, f"model_{step:06d}.pt")
    meta_path = os.path.join(checkpoint_dir, f"meta_{step:06d}.json")
    if not os.path.exists(model_path) or not os.path.exists(meta_path):
        steps = list_steps(checkpoint_dir)
        available = f"saved steps there: {', '.join(map(str, steps))}" if steps else "no checkpoints there"
        raise FileNotFoundError(f"no checkpoint of step {step} in {checkpoint_dir} ({available})")
    model_data = torch.load(model_path, map_location=device)
    optimizer_data = None
    if load_optimizer:
        optimizer_path = os.path.join(checkpoint_dir, f"optim_{step:06d}_rank{rank:d}.pt")
        if not os.path.exists(optimizer_path):
            raise FileNotFoundError(
                f"{optimizer_path} is missing: optimizer states are saved per rank, so resume with the "
                f"same number of processes that saved step {step}")
        optimizer_data = torch.load(optimizer_path, map_location=device)
    with open(meta_path, encoding="utf-8") as f:
        meta_data = json.load(f)
    return model_data, optimizer_data, meta_data


def build_model(checkpoint_dir, step, device, phase):
    """
    A ready model from a checkpoint: (model, tokenizer, meta_data). The model is uncompiled,
    not wrapped, on `device`, in eval or train mode by `phase`.
    """
    from nanochat.gpt import GPTConfig, build_gpt  # imported here so saving/loading files needs no model code
    from nanochat.tokenizer import get_tokenizer

    if phase not in ("train", "eval"):
        raise ValueError(f"phase must be 'train' or 'eval', got {phase!r}")
    device = torch.device(device)
    model_data, _, meta_data = load_checkpoint(checkpoint_dir, step, device, load_optimizer=False)
    if device.type in ("cpu", "mps"):
        # bf16 weights (from a CUDA run) run in fp32 on these devices
        model_data = {k: v.float() if v.dtype == torch.bfloat16 else v for k, v in model_data.items()}
    # torch.compile'd models save their keys under "_orig_mod."
    model_data = {k.removeprefix("_orig_mod."): v for k, v in model_data.items()}
    model_config = GPTConfig(**meta_data["model_config"])
    print0(f"Building model with config: {meta_data['model_config']}")
    model = build_gpt(model_config, device)  # init fills the non-persistent rotary tables the state_dict lacks
    model.load_state_dict(model_data, strict=True, assign=True)
    model.train() if phase == "train" else model.eval()
    tokenizer = get_tokenizer()
    if tokenizer.get_vocab_size() != model_config.vocab_size:
        raise ValueError(
            f"the tokenizer in {get_base_dir()}/tokenizer has {tokenizer.get_vocab_size():,} tokens but the "
            f"checkpoint in {checkpoint_dir} was trained with {model_config.vocab_size:,}: use the tokenizer "
            f"the model was trained with (same NANOCHAT_BASE_DIR)")
    return model, tokenizer, meta_data


def list_steps(checkpoint_dir):
    """Steps with a complete checkpoint (model and meta file), ascending."""
    steps = []
    for path in glob.glob(os.path.join(checkpoint_dir, "model_*.pt")):
        match = re.fullmatch(r"model_(\d+)\.pt", os.path.basename(path))
        if match and os.path.exists(os.path.join(checkpoint_dir, f"meta_{match.group(1)}.json")):
            steps.append(int(match.group(1)))
    return sorted(steps)


def find_last_step(checkpoint_dir):
    steps = list_steps(checkpoint_dir)
    if not steps:
        raise FileNotFoundError(f"no checkpoints found in {checkpoint_dir}")
    return steps[-1]


def find_largest_model(checkpoints_dir):
    """The model tag to use when none is given: the deepest d<N>, else the most recently written."""
    tags = [t for t in os.listdir(checkpoints_dir) if os.path.isdir(os.path.join(checkpoints_dir, t))] if os.path.isdir(checkpoints_dir) else []
    tags = [t for t in tags if list_steps(os.path.join(checkpoints_dir, t))]
    if not tags:
        raise FileNotFoundError(f"no checkpoints found in {checkpoints_dir}")
    depths = [(int(m.group(1)), t) for t in tags if (m := re.fullmatch(r"d(\d+)", t))]
    if depths:
        return max(depths)[1]
    return max(tags, key=lambda t: os.path.getmtime(os.path.join(checkpoints_dir, t)))


def load_model(source, device, phase, model_tag=None, step=None):
    """
    Load the model of a training phase ("base", "mid", "sft", "rl") from <base>/<phase folder>/,
    by default the largest model tag and its last step. Returns (model, tokenizer, meta_data).
    """
    if source not in CHECKPOINT_FOLDERS:
        raise ValueError(f"source must be one of {', '.join(CHECKPOINT_FOLDERS)}, got {source!r}")
    checkpoints_dir = os.path.join(get_base_dir(), CHECKPOINT_FOLDERS[source])
    train_hint = f"train one first with `{TRAINING_COMMANDS[source]}`"
    if model_tag is None:
        try:
            model_tag = find_largest_model(checkpoints_dir)
        except FileNotFoundError:
            raise FileNotFoundError(f"no {source} model checkpoints in {checkpoints_dir}: {train_hint}") from None
        print0(f"No model tag given, using the largest model: {model_tag}")
    checkpoint_dir = os.path.join(checkpoints_dir, model_tag)
    if step is None:
        try:
            step = find_last_step(checkpoint_dir)
        except FileNotFoundError:
            tags = sorted(os.listdir(checkpoints_dir)) if os.path.isdir(checkpoints_dir) else []
            others = f" (model tags there: {', '.join(tags)})" if tags else ""
            raise FileNotFoundError(f"no checkpoints of model tag {model_tag!r} in {checkpoints_dir}{others}: {train_hint}") from None
    print0(f"Loading model from {checkpoint_dir} at step {step}")
    return build_model(checkpoint_dir, step, device, phase)
