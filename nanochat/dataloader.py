"""
Streaming pretraining batches: parquet text -> tokens -> (inputs, targets) of shape (B, T).

Documents are read in order, one parquet row group at a time; rank r of a world of size W takes
row groups r, r+W, r+2W, ... of every file. Each document becomes <|bos|> + its tokens, and all of
them are concatenated into one stream. Every batch takes the next B*T+1 tokens of that stream:
inputs are the first B*T, targets the same tokens shifted by one. Both splits cycle forever.

Exact resume: the state yielded with each batch points at the first token of the stream that the
batch did not use, as (epoch, shard, row group, document in the row group, token in the document).
Passing it back as resume_state_dict continues with exactly the batch that would have come next.
The state is per rank; under torchrun use gather_loader_state() to collect every rank's state into
one JSON-serialisable dict for the checkpoint, and pass that same dict back to every rank.
"""

from collections import deque

import torch
import torch.distributed as dist

from nanochat.common import get_dist_info, print0
from nanochat.dataset import list_split_files, open_shard, read_texts

STATE_KEYS = ("epoch", "shard", "row_group", "doc", "token")


def _own_state(resume_state_dict, split, rank, world_size):
    """
    Pick this rank's exact start position out of resume_state_dict, or None to start from scratch.
    A state saved by another rank or world size cannot be exact: then, like the reference, restart
    at the next round of row groups after the saved one (a few documents are skipped, none repeated).
    """
    if resume_state_dict is None:
        return None
    state = resume_state_dict
    if "ranks" in state:  # collected by gather_loader_state()
        states = state["ranks"]
        state = states[rank] if len(states) == world_size else states[0]
    missing = [k for k in STATE_KEYS if k not in state]
    if missing:
        raise ValueError(f"resume_state_dict lacks {missing}: expected a state yielded by "
                         f"tokenizing_distributed_data_loader, got {resume_state_dict}")
    if state.get("split", split) != split:
        raise ValueError(f"resume_state_dict is for the {state['split']!r} split, not {split!r}")
    if state.get("rank", 0) == rank and state.get("world_size", 1) == world_size:
        return {k: state[k] for k in STATE_KEYS}
    print0(f"Dataloader: resume state was saved by rank {state.get('rank', 0)} of {state.get('world_size', 1)}, "
           f"now rank {rank} of {world_size}: resuming approximately at the next row group round "
           f"(save gather_loader_state() for an exact resume)")
    next_round = (state["row_group"] // world_size + 1) * world_size
    return {"epoch": state["epoch"], "shard": state["shard"], "row_group": next_round + rank, "doc": 0, "token": 0}


def _document_chunks(split, rank, world_size, chunk_size, start):
    """
    Yield ((epoch, shard, row_group, first_doc), texts) forever, at most chunk_size texts at a time,
    for this rank's row groups, beginning at `start` (a state dict) or at the very beginning.
    """
    files = list_split_files(split)
    # every footer now (a damaged shard is named before any training); checksums when each shard is reached
    row_groups = {shard: open_shard(path, verify=False).num_row_groups for shard, path in files}
    if not any(n > rank for n in row_groups.values()):
        raise ValueError(f"The {split} split has no row group for rank {rank} of {world_size} "
                         f"(row groups per shard: {row_groups}); download more shards or use fewer ranks")
    epoch, first_shard, first_rg, first_doc = 0, None, None, 0
    if start is not None:
        epoch, first_shard, first_rg, first_doc = start["epoch"], start["shard"], start["row_group"], start["doc"]
        if first_shard not in row_groups:
            raise ValueError(f"Cannot resume: shard {first_shard} of the {split} split is not on disk any more "
                             f"(have {sorted(row_groups)})")
        if first_rg % world_size != rank:
            raise ValueError(f"Cannot resume: row group {first_rg} does not belong to rank {rank} of {world_size}")
    while True:
        for shard, path in files:
            if first_shard is not None and shard < first_shard:
                continue  # before the resume point (first epoch after a resume only)
            pf = open_shard(path)
            rg_start = rank
            if first_shard is not None:
                rg_start, first_shard = first_rg, None
            for rg in range(rg_start, pf.num_row_groups, world_size):
                texts = read_texts(pf, path, rg)
                for i in range(first_doc, len(texts), chunk_size):
                    yield (epoch, shard, rg, i), texts[i:i + chunk_size]
                first_doc = 0
        epoch += 1


def tokenizing_distributed_data_loader(B, T, split, tokenizer_threads=4, tokenizer_batch_size=128, device="cuda",
                                       resume_state_dict=None, tokenizer=None):
    """
    Yield (inputs, targets, state_dict) forever: int64 tensors (B, T) on `device`, and a small
    JSON-serialisable dict that resumes this loader at the exact next batch.
    tokenizer defaults to get_tokenizer() (the one trained by scripts.tok_train).
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if B < 1 or T < 1:
        raise ValueError(f"batch size B and sequence length T must be positive, got B={B}, T={T}")
    if tokenizer is None:
        from nanochat.tokenizer import get_tokenizer
        tokenizer = get_tokenizer()
    bos = tokenizer.get_bos_token_id()
    _, rank, _, world_size = get_dist_info()
    start = _own_state(resume_state_dict, split, rank, world_size)
    chunks = _document_chunks(split, rank, world_size, tokenizer_batch_size, start)
    use_cuda = torch.device(device).type == "cuda"  # pinned host memory lets the copy overlap compute

    # Tokenized documents not yet fully used, oldest first: [position, tokens, tokens already used].
    # The head document's position and used count are exactly where the stream stands.
    docs = deque()
    available = 0  # unused tokens in docs
    skip = start["token"] if start is not None else 0  # tokens of the first document used before the resume
    needed = B * T + 1  # +1: the target of the last input position
    while True:
        while available < needed:
            (epoch, shard, rg, first_doc), texts = next(chunks)
            for j, tokens in enumerate(tokenizer.encode(texts, prepend=bos, num_threads=tokenizer_threads)):
                docs.append([(epoch, shard, rg, first_doc + j), tokens, skip])
                available += len(tokens) - skip
                skip = 0
        batch = []
        while len(batch) < needed:
            if docs[0][2] == len(docs[0][1]):
                docs.popleft()  # drop used-up documents only now, so docs[0] is always the position
            _, tokens, used = docs[0]
            take = min(needed - len(batch), len(tokens) - used)
            batch.extend(tokens[used:used + take])
            docs[0][2] = used + take
        available -= needed
        (epoch, shard, rg, doc), _, used = docs[0]
        state_dict = {"epoch": epoch, "shard": shard, "row_group": rg, "doc": doc, "token": used,
                      "split": split, "rank": rank, "world_size": world_size}
        scratch = torch.tensor(batch, dtype=torch.long, pin_memory=use_cuda)  # (B*T+1,)
        inputs = scratch[:-1].view(B, T).to(device=device, non_blocking=use_cuda)
        targets = scratch[1:].view(B, T).to(device=device, non_blocking=use_cuda)
        yield inputs, targets, state_dict


def gather_loader_state(state_dict):
    """
    Every rank's loader state in one dict {"ranks": [state of rank 0, rank 1, ...]} for the checkpoint.
    A collective under torchrun: all ranks must call it. Single process: the state itself.
    """
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return state_dict
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, state_dict)
    return {"ranks": states}
