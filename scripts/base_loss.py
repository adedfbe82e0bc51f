"""
Bits per byte of a base model checkpoint on larger slices of the train and val splits, plus a few
greedy samples from fixed prompts.

    python -m scripts.base_loss --split_tokens=1048576 --device_batch_size=8
    torchrun --standalone --nproc_per_node=8 -m scripts.base_loss
"""

from contextlib import nullcontext

import torch

from nanochat.common import autodetect_device_type, compute_init, compute_cleanup, print0
from nanochat.configurator import configure
from nanochat.checkpoint_manager import load_model
from nanochat.dataloader import tokenizing_distributed_data_loader
from nanochat.engine import SAMPLE_PROMPTS, greedy_sample
from nanochat.tokenizer import get_token_bytes
from nanochat.loss_eval import evaluate_bpb
from nanochat.report import get_report

# -----------------------------------------------------------------------------
# Settings (--name=value on the command line; --help prints this block)

# How much to evaluate
split_tokens = 20 * 524288  # tokens evaluated per split, summed over ranks
device_batch_size = 32  # sequences per forward pass per rank (lower it if memory runs out)
sample_tokens = 16  # tokens generated greedily per sample prompt
# Which checkpoint
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
sequence_len = meta["model_config"]["sequence_len"]
tokens_per_step = device_batch_size * sequence_len * world_size
if split_tokens % tokens_per_step != 0:
    raise SystemExit(
        f"--split_tokens={split_tokens} is not a multiple of device_batch_size x sequence_len x ranks = "
        f"{device_batch_size} x {sequence_len} x {world_size} = {tokens_per_step}; pick a multiple"
    )
steps = split_tokens // tokens_per_step
token_bytes = get_token_bytes(device=device)
print0(f"Step {meta['step']}: {steps} batches of {device_batch_size}x{sequence_len} per rank per split")

bpb = {}
for split in ("train", "val"):
    loader = tokenizing_distributed_data_loader(device_batch_size, sequence_len, split, device=device,
                                                tokenizer=tokenizer)
    with autocast_ctx:
        bpb[split] = evaluate_bpb(model, loader, steps, token_bytes)
    print0(f"{split} bpb: {bpb[split]:.4f}")

samples = []
if rank == 0:
    for prompt in SAMPLE_PROMPTS:
        samples.append(greedy_sample(model, tokenizer, prompt, sample_tokens, autocast_ctx))
        print(samples[-1])

get_report().log(section="Base model loss", data=[
    {"train bpb": bpb["train"], "val bpb": bpb["val"], "step": meta["step"], "split tokens": split_tokens},
    {f"sample {i}": sample for i, sample in enumerate(samples)},
])
compute_cleanup()
