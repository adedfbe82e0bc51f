"""
Batches of conversations for the chat stages, each able to restart at an exact position.

- Midtraining packs conversations into a pretraining-style stream: the ids of each rendered
  conversation (tokenizer.render_conversation) are concatenated, and every batch takes the next
  B*T+1 of them as B rows of T inputs and the same shifted by one as targets. Conversations run
  across row and batch boundaries; the mask is not used (every token is trained on).
- SFT keeps one conversation per row, padded to the longest row of the batch, with targets -1
  (ignored by the loss) wherever the mask is 0 and on the padding.

Under torchrun, rank r takes conversations r, r+W, r+2W, ... of the dataset, epoch after epoch.
Every batch comes with a small state dict; passing it back as `resume_state` continues with exactly
the batch that would have come next (use nanochat.dataloader.gather_loader_state to save every rank's).
"""

import torch

from nanochat.common import get_dist_info


def _own_state(resume_state, rank, world_size):
    """This rank's state out of a saved one ({"ranks": [...]} under torchrun), or None to start fresh."""
    if resume_state is None:
        return None
    if "ranks" in resume_state:
        states = resume_state["ranks"]
        if len(states) != world_size:
            raise ValueError(f"the checkpoint's data positions were saved by {len(states)} processes, this run has "
                             f"{world_size}: resume with the same number of processes")
        return states[rank]
    if world_size != 1:
        raise ValueError("the checkpoint's data position was saved by 1 process: resume it with 1 process")
    return resume_state


def _rank_indices(dataset, rank, world_size):
    indices = range(rank, len(dataset), world_size)
    if len(indices) == 0:
        raise ValueError(f"the dataset has {len(dataset)} conversations: too few for rank {rank} of {world_size}")
    return indices


def packed_conversation_loader(dataset, tokenizer, batch_size, seq_len, device, resume_state=None):
    """
    Yields (inputs (B, T), targets (B, T), state) forever. state["epoch_fraction"] counts the rank's
    conversations rendered so far in epochs (1.0 = each of its conversations once), which midtraining
    uses as its progress; state["conversation"] and ["offset"] say where the next batch begins.
    """
    _, rank, _, world_size = get_dist_info()
    indices = _rank_indices(dataset, rank, world_size)
    start = _own_state(resume_state, rank, world_size)
    needed = batch_size * seq_len + 1  # one more token for the last target (then dropped, as in the reference)
    j, offset = (start["conversation"], start["offset"]) if start else (0, 0)  # j: position in this rank's stream
    use_cuda = torch.device(device).type == "cuda"
    buffer, ids = [], []
    while True:
        while len(buffer) < needed:
            ids, _ = tokenizer.render_conversation(dataset[indices[j % len(indices)]])
            buffer.extend(ids[offset:])
            offset = 0  # only the first conversation after a resume starts part-way
            j += 1
        batch, buffer = buffer[:needed], buffer[needed:]
        # what is left is the tail of the last conversation rendered (it is shorter than that conversation)
        if buffer:
            state = {"conversation": j - 1, "offset": len(ids) - len(buffer)}
        else:
            state = {"conversation": j, "offset": 0}
        state["epoch_fraction"] = j / len(indices)
        tokens = torch.tensor(batch, dtype=torch.long, pin_memory=use_cuda)  # (B*T+1,)
        inputs = tokens[:-1].view(batch_size, seq_len).to(device, non_blocking=use_cuda)
        targets = tokens[1:].view(batch_size, seq_len).to(device, non_blocking=use_cuda)
        yield inputs, targets, state


def collate_sft(rows, pad_id):
    """
    [(ids, mask), ...] -> inputs, targets of shape (B, longest - 1). Row i's targets are its ids shifted by
    one, set to -1 where the mask of the target token is 0 and on the padding; inputs are padded with pad_id.
    """
    width = max(len(ids) for ids, _ in rows) - 1
    inputs = torch.full((len(rows), width), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), width), -1, dtype=torch.long)
    for i, (ids, mask) in enumerate(rows):
        ids, mask = torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)
        n = len(ids) - 1
        inputs[i, :n] = ids[:-1]
        targets[i, :n] = torch.where(mask[1:] == 1, ids[1:], -1)
    return inputs, targets


def sft_loader(dataset, tokenizer, batch_size, device, max_tokens=2048, resume_state=None):
    """
    Yields (inputs, targets, state) forever: batch_size conversations per batch, one per row (collate_sft),
    each cut to max_tokens. <|assistant_end|> pads the inputs (those positions are never targets).
    """
    _, rank, _, world_size = get_dist_info()
    indices = _rank_indices(dataset, rank, world_size)
    start = _own_state(resume_state, rank, world_size)
    pad_id = tokenizer.encode_special("<|assistant_end|>")
    j = start["conversation"] if start else 0
    while True:
        rows = []
        for _ in range(batch_size):
            rows.append(tokenizer.render_conversation(dataset[indices[j % len(indices)]], max_tokens=max_tokens))
            j += 1
        inputs, targets = collate_sft(rows, pad_id)
        yield inputs.to(device), targets.to(device), {"conversation": j, "epoch_fraction": j / len(indices)}
