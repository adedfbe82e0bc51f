"""
Saving and loading training checkpoints, in the reference's layout:

    <base>/base_checkpoints/<model_tag>/model_{step:06d}.pt          model state_dict (rank 0)
    <base>/base_checkpoints/<model_tag>/optim_{step:06d}_rank{r}.pt  each rank's optimizer states (sharded)
    <base>/base_checkpoints/<model_tag>/meta_{step:06d}.json         step, configs, data and loop state

Every file goes through a temporary neighbour and a rename, so an interrupted save never leaves a
half-written file behind. The meta file is written last, once every rank's files are on disk, so a
step counts as saved exactly when its meta file exists. It also records the size and CRC-32 of each
file of the step (and a checksum of itself): loading verifies them, so a file that was cut short or
changed later (full disk, interrupted copy, bad disk) is named, with the latest earlier intact step.
Checkpoints from before these records existed load as they are.
"""

import glob
import json
import os
import re
import sys
import zlib

import torch
import torch.distributed as dist

from nanochat.common import atomic_write, get_base_dir, print0
from nanochat.integrity import DamagedFileError, record_problem, verify_file, write_recorded

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


def model_filename(step):
    return f"model_{step:06d}.pt"


def optimizer_filename(step, rank):
    return f"optim_{step:06d}_rank{rank:d}.pt"


def meta_filename(step):
    return f"meta_{step:06d}.json"


def meta_checksum(meta):
    """CRC-32 of the meta content (without its own checksum), independent of key order."""
    return f"{zlib.crc32(json.dumps(meta, sort_keys=True).encode()):08x}"


def save_checkpoint(checkpoint_dir, step, model_data, optimizer_data, meta_data, rank=0, world_size=1):
    """
    Rank 0 writes the model and the meta file; each rank writes its optimizer shard (if given).
    world_size: the number of ranks calling this together. Under torchrun call it on every rank with
    the world size: the ranks then exchange their file records and rank 0 writes the meta file only
    once every shard is on disk, and no rank returns before the step is complete. With the default 1
    no collective is used (e.g. rank 0 alone saving a model).
    """
    os.makedirs(checkpoint_dir, exist_ok=True)
    records = {}  # file name -> {"size", "crc32"}
    if optimizer_data is not None:
        name = optimizer_filename(step, rank)
        records[name] = write_recorded(os.path.join(checkpoint_dir, name), lambda f: torch.save(optimizer_data, f))
    if rank == 0:
        name = model_filename(step)
        records[name] = write_recorded(os.path.join(checkpoint_dir, name), lambda f: torch.save(model_data, f))
    if world_size > 1:
        every_rank = [None] * world_size
        dist.all_gather_object(every_rank, records)  # returns once every rank has written its files
        records = {name: record for rank_records in every_rank for name, record in rank_records.items()}
    if rank == 0:
        meta = {**meta_data, "files": records}
        meta["checksum"] = meta_checksum(meta)
        meta_path = os.path.join(checkpoint_dir, meta_filename(step))
        atomic_write(meta_path, lambda f: json.dump(meta, f, indent=2), mode="w")
        print0(f"Saved checkpoint of step {step} to {checkpoint_dir}")
    if world_size > 1:
        dist.barrier()  # the meta file exists: the step is complete for everyone


def _parse_meta(path):
    """(meta without its records, records or None if it predates them, problem or None)."""
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, None, f"it is not valid JSON ({e})"
    if not isinstance(meta, dict):
        return None, None, "it does not hold a JSON object"
    checksum = meta.pop("checksum", None)
    if checksum is not None and checksum != meta_checksum(meta):
        return None, None, "its content differs from what was saved (checksum mismatch)"
    return meta, meta.pop("files", None), None


def read_meta(checkpoint_dir, step, rank=0, load_optimizer=False):
    """
    The meta dict of a step as it was saved (without the file records), and the records (None if it
    predates them). rank and load_optimizer only shape the advice given if it is damaged.
    """
    path = os.path.join(checkpoint_dir, meta_filename(step))
    meta, records, problem = _parse_meta(path)
    if problem is not None:
        raise DamagedFileError(path, problem, _earlier_step_hint(checkpoint_dir, step, rank, load_optimizer))
    return meta, records


def _step_problem(checkpoint_dir, step, rank=0, load_optimizer=False, full=True):
    """
    None if the step's files (model, meta, and this rank's optimizer shard if wanted) are intact,
    else (path, problem).
    """
    meta_path = os.path.join(checkpoint_dir, meta_filename(step))
    if not os.path.exists(meta_path):
        return meta_path, "the file is missing"
    _, records, problem = _parse_meta(meta_path)
    if problem is not None:
        return meta_path, problem
    wanted = [model_filename(step)] + ([optimizer_filename(step, rank)] if load_optimizer else [])
    for name in wanted:
        path = os.path.join(checkpoint_dir, name)
        if records is None or name not in records:  # saved before the records existed: presence only
            if not os.path.exists(path):
                return path, "the file is missing"
        elif (problem := record_problem(path, records[name], full=full)) is not None:
            return path, problem
    return None


def _saved_steps(checkpoint_dir):
    """Steps whose meta file exists (a save that finished), ascending."""
    steps = []
    for path in glob.glob(os.path.join(checkpoint_dir, "meta_*.json")):
        match = re.fullmatch(r"meta_(\d+)\.json", os.path.basename(path))
        if match:
            steps.append(int(match.group(1)))
    return sorted(steps)


def _earlier_step_hint(checkpoint_dir, step, rank=0, load_optimizer=False):
    """What to do instead of loading a damaged step: the latest earlier step that is intact (fully checked)."""
    for earlier in reversed([s for s in _saved_steps(checkpoint_dir) if s < step]):
        if _step_problem(checkpoint_dir, earlier, rank, load_optimizer) is None:
            how = f"resume with --resume_from_step={earlier}" if load_optimizer else f"load it with --step={earlier}"
            return (f"The latest earlier step in {checkpoint_dir} that is intact is {earlier}: {how} "
                    f"(or restore the damaged file from a copy).")
    return f"No earlier step in {checkpoint_dir} is intact: restore the file from a copy, or train again from scratch."


def _load_file(checkpoint_dir, step, name, records, device, rank, load_optimizer):
    """torch.load of one checkpoint file (weights only), verified against its record when there is one."""
    path = os.path.join(checkpoint_dir, name)
    if records is not None and name in records:
        verify_file(path, records[name], _earlier_step_hint(checkpoint_dir, step, rank, load_optimizer))
        return torch.load(path, map_location=device, weights_only=True)  # verified: a failure here is a bug
    try:  # no record (an older checkpoint): an unreadable file is still reported as damaged
        return torch.load(path, map_location=device, weights_only=True)
    except (RuntimeError, EOFError, ValueError) as e:
        if "weights_only" in str(e):
            raise  # not damage: the file holds objects that only an unsafe load could rebuild
        raise DamagedFileError(path, f"torch cannot read it ({str(e).splitlines()[0]})",
                               _earlier_step_hint(checkpoint_dir, step, rank, load_optimizer)) from None


def load_checkpoint(checkpoint_dir, step, device, load_optimizer=False, rank=0):
    """
    Returns (model_data, optimizer_data or None, meta_data) of one step, every file verified
    against the sizes and checksums recorded when it was saved (DamagedFileError otherwise).
    """
    model_path = os.path.join(checkpoint_dir, model_filename(step))
    meta_path = os.path.join(checkpoint_dir, meta_filename(step))
    if not os.path.exists(meta_path):
        steps = list_steps(checkpoint_dir)
        available = f"saved steps there: {', '.join(map(str, steps))}" if steps else "no checkpoints there"
        raise FileNotFoundError(f"no checkpoint of step {step} in {checkpoint_dir} ({available})")
    meta_data, records = read_meta(checkpoint_dir, step, rank, load_optimizer)
    if not os.path.exists(model_path):
        raise DamagedFileError(model_path, "the file is missing",
                               _earlier_step_hint(checkpoint_dir, step, rank, load_optimizer))
    model_data = _load_file(checkpoint_dir, step, model_filename(step), records, device, rank, load_optimizer)
    optimizer_data = None
    if load_optimizer:
        name = optimizer_filename(step, rank)
        saved_ranks = sum(1 for n in (records or {}) if n.startswith(f"optim_{step:06d}_rank"))
        if not os.path.exists(os.path.join(checkpoint_dir, name)):
            if records is not None and name in records:  # it was written: it went missing since
                raise DamagedFileError(os.path.join(checkpoint_dir, name), "the file is missing",
                                       _earlier_step_hint(checkpoint_dir, step, rank, load_optimizer))
            saved_by = f" ({saved_ranks} did)" if saved_ranks else ""
            raise FileNotFoundError(
                f"{os.path.join(checkpoint_dir, name)} is missing: optimizer states are saved per rank, so resume with "
                f"the same number of processes that saved step {step}{saved_by}")
        optimizer_data = _load_file(checkpoint_dir, step, name, records, device, rank, load_optimizer)
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
    """
    Steps with a complete checkpoint, ascending: the meta file exists (written last) and the model
    file is there with the size it was saved with. A step whose files went missing or changed size
    is left out with a warning; checksums are verified when a step is loaded.
    """
    steps = []
    for step in _saved_steps(checkpoint_dir):
        problem = _step_problem(checkpoint_dir, step, full=False)
        if problem is None:
            steps.append(step)
        else:
            print0(f"warning: skipping step {step} of {checkpoint_dir}: {problem[0]} is damaged ({problem[1]})",
                   file=sys.stderr)
    return steps


def find_last_step(checkpoint_dir):
    """
    The last step whose save finished (its meta file exists), damaged or not: loading it then says
    which file is damaged and which earlier step is intact, rather than quietly using an older model.
    """
    steps = _saved_steps(checkpoint_dir)
    if not steps:
        raise FileNotFoundError(f"no checkpoints found in {checkpoint_dir}")
    return steps[-1]


def find_largest_model(checkpoints_dir):
    """The model tag to use when none is given: the deepest d<N>, else the most recently written."""
    tags = os.listdir(checkpoints_dir) if os.path.isdir(checkpoints_dir) else []
    tags = [t for t in tags if os.path.isdir(os.path.join(checkpoints_dir, t))
            and _saved_steps(os.path.join(checkpoints_dir, t))]
    if not tags:
        raise FileNotFoundError(f"no checkpoints found in {checkpoints_dir}")
    depths = [(int(m.group(1)), t) for t in tags if (m := re.fullmatch(r"d(\d+)", t))]
    if depths:
        return max(depths)[1]
    return max(tags, key=lambda t: os.path.getmtime(os.path.join(checkpoints_dir, t)))


def find_checkpoint(source, model_tag=None, step=None):
    """
    Where the model of a training phase ("base", "mid", "sft", "rl") is: (checkpoint_dir, model_tag, step),
    by default the largest model tag and its last step. FileNotFoundError says what to train when none is.
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
            raise FileNotFoundError(f"no checkpoints of model tag {model_tag!r} in {checkpoints_dir}{others}: "
                                    f"{train_hint}") from None
    return checkpoint_dir, model_tag, step


def load_model(source, device, phase, model_tag=None, step=None):
    """
    Load the model of a training phase ("base", "mid", "sft", "rl") from <base>/<phase folder>/,
    by default the largest model tag and its last step. Returns (model, tokenizer, meta_data).
    """
    checkpoint_dir, _, step = find_checkpoint(source, model_tag, step)
    print0(f"Loading model from {checkpoint_dir} at step {step}")
    return build_model(checkpoint_dir, step, device, phase)
