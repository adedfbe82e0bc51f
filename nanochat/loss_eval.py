"""
Bits per byte (bpb): the validation loss of a base model, normalised by the bytes of text it covers.

Mean loss per token depends on the tokenizer (a bigger vocabulary packs more text into each token),
so instead we sum the loss in nats over the target tokens and divide by ln(2) times the number of
UTF-8 bytes those targets stand for. Two models with different vocabularies are then comparable.

Targets that carry no bytes are left out of both sums: special tokens (token_bytes is 0 for them)
and ignored positions (target id < 0, e.g. ignore_index=-1).
"""

import math

import torch
import torch.distributed as dist


@torch.no_grad()
def evaluate_bpb(model, batches, steps, token_bytes):
    """
    Bits per byte over `steps` batches of (inputs, targets) drawn from the iterable `batches`.
    token_bytes: (vocab_size,) integer tensor on the model's device, bytes per token id (0 = do not count).
    Under torchrun the sums are added over all ranks, so every rank returns the same number.
    """
    device = model.get_device()
    total_nats = torch.tensor(0.0, dtype=torch.float32, device=device)
    total_bytes = torch.tensor(0, dtype=torch.int64, device=device)
    batch_iter = iter(batches)
    for _ in range(steps):
        inputs, targets = next(batch_iter)[:2]  # loaders may yield a third item (resume state)
        losses = model(inputs, targets, loss_reduction="none").view(-1)  # (B*T,) nats
        targets = targets.view(-1)
        # Ignored targets (< 0) must not index token_bytes: send them to id 0 and zero their bytes.
        # (compared as int32: MPS has no int64 "less than" kernel)
        valid = targets.int() >= 0
        safe_targets = torch.where(valid, targets, torch.zeros_like(targets))
        no_bytes = torch.zeros_like(safe_targets, dtype=token_bytes.dtype)
        num_bytes = torch.where(valid, token_bytes[safe_targets], no_bytes)
        counted = num_bytes > 0
        # where() rather than a product: a 0-byte position must add nothing even if its loss is inf/nan
        total_nats += torch.where(counted, losses.float(), torch.zeros_like(losses, dtype=torch.float32)).sum()
        total_bytes += num_bytes.sum().to(torch.int64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(total_nats, op=dist.ReduceOp.SUM)
        dist.all_reduce(total_bytes, op=dist.ReduceOp.SUM)
    total_nats, total_bytes = total_nats.item(), total_bytes.item()
    if total_bytes == 0:
        return float("inf")  # nothing countable was seen
    return total_nats / (math.log(2) * total_bytes)
