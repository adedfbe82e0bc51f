"""Streaming loader: batch layout against an independently built token stream, ranks, epochs, exact resume."""

import json
import random

import pytest
import torch

from nanochat import dataset
from nanochat.dataloader import tokenizing_distributed_data_loader, gather_loader_state
from nanochat.tokenizer import RustBPETokenizer, get_tokenizer_dir
from conftest import write_text_parquet

ROWS_PER_GROUP = 4
TRAIN_SHARDS = [0, 1, 2]
VAL_SHARD = 3
WORDS = "the cat sat on a mat while 12 dogs ran über 345 hills, ünïcode ☃ and tabs\tor\nnew lines".split(" ")


def make_texts(shard, num_docs):
    rng = random.Random(shard)
    # unique, varied lengths (some shorter than a row of a batch, some spanning several batches)
    return [f"<s{shard} d{j}> " + " ".join(rng.choice(WORDS) for _ in range(rng.choice([0, 2, 5, 30, 80])))
            for j in range(num_docs)]


@pytest.fixture(scope="module")
def tokenizer():
    texts = [t for s in TRAIN_SHARDS for t in make_texts(s, 22)]
    return RustBPETokenizer.train_from_iterator(iter(texts), vocab_size=300)


@pytest.fixture
def shards(base_dir, monkeypatch):
    """Train shards 0..2 (22 docs each: row groups of 4,4,4,4,4,2) and validation shard 3."""
    monkeypatch.setenv("NANOCHAT_DATA_MAX_SHARD", str(VAL_SHARD))
    for shard in TRAIN_SHARDS + [VAL_SHARD]:
        path = base_dir / "base_data" / dataset.shard_filename(shard)
        write_text_parquet(path, make_texts(shard, 22 if shard != VAL_SHARD else 9), ROWS_PER_GROUP)


def set_rank(monkeypatch, rank, world_size):
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("LOCAL_RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world_size))


def expected_stream(tokenizer, split, rank=0, world_size=1):
    """One epoch of this rank's token stream, built the slow obvious way."""
    stream = []
    for texts in dataset.parquets_iter_batched(split, start=rank, step=world_size):
        for text in texts:
            stream += [tokenizer.get_bos_token_id()] + tokenizer.encode(text)
    return stream


def take(loader, n):
    return [next(loader) for _ in range(n)]


def test_batches_are_the_token_stream_cut_in_rows(shards, tokenizer):
    B, T = 3, 16
    loader = tokenizing_distributed_data_loader(B, T, "train", tokenizer_batch_size=5, device="cpu",
                                                tokenizer=tokenizer)
    epoch = expected_stream(tokenizer, "train")
    stream = epoch * 3
    n = B * T + 1
    num_batches = 2 * len(epoch) // n  # crosses the end of the first epoch
    for k, (inputs, targets, state) in enumerate(take(loader, num_batches)):
        assert inputs.shape == targets.shape == (B, T) and inputs.dtype == targets.dtype == torch.int64
        window = torch.tensor(stream[k * n:(k + 1) * n])  # each batch uses B*T+1 fresh tokens
        assert torch.equal(inputs.flatten(), window[:-1])
        assert torch.equal(targets.flatten(), window[1:])
        json.dumps(state)  # goes into the checkpoint's meta json
    assert state["epoch"] == 1  # the train split cycles


def test_every_document_starts_with_bos(shards, tokenizer):
    loader = tokenizing_distributed_data_loader(2, 32, "train", device="cpu", tokenizer=tokenizer)
    bos = tokenizer.get_bos_token_id()
    epoch = expected_stream(tokenizer, "train")
    tokens = []
    while len(tokens) < len(epoch):
        inputs, targets, _ = next(loader)
        tokens += inputs.flatten().tolist() + targets.flatten()[-1:].tolist()
    docs = tokenizer.decode(tokens[:len(epoch)]).split("<|bos|>")
    assert tokens[0] == bos and docs[0] == ""
    all_texts = [t for s in TRAIN_SHARDS for t in make_texts(s, 22)]
    assert docs[1:] == all_texts


def test_validation_split_is_the_max_shard_and_cycles(shards, tokenizer):
    B, T = 2, 8
    epoch = expected_stream(tokenizer, "val")
    loader = tokenizing_distributed_data_loader(B, T, "val", device="cpu", tokenizer=tokenizer)
    n = B * T + 1
    num_batches = 3 * len(epoch) // n + 1
    stream = epoch * 4
    for k, (inputs, _, state) in enumerate(take(loader, num_batches)):
        assert torch.equal(inputs.flatten(), torch.tensor(stream[k * n:(k + 1) * n - 1]))
        assert state["shard"] == VAL_SHARD
    assert state["epoch"] == 3


def test_two_ranks_read_disjoint_row_groups(shards, tokenizer, monkeypatch):
    B, T = 2, 8
    docs_seen = []
    for rank in (0, 1):
        set_rank(monkeypatch, rank, 2)
        epoch = expected_stream(tokenizer, "train", rank, 2)
        loader = tokenizing_distributed_data_loader(B, T, "train", device="cpu", tokenizer=tokenizer)
        n = B * T + 1
        for k, (inputs, targets, state) in enumerate(take(loader, len(epoch) // n)):
            assert torch.equal(inputs.flatten(), torch.tensor(epoch[k * n:(k + 1) * n - 1]))
            assert state["row_group"] % 2 == rank and state["rank"] == rank
        docs_seen.append(set(tokenizer.decode(epoch).split("<|bos|>")[1:]))
    all_texts = {t for s in TRAIN_SHARDS for t in make_texts(s, 22)}
    assert docs_seen[0].isdisjoint(docs_seen[1])
    assert docs_seen[0] | docs_seen[1] == all_texts


@pytest.mark.parametrize("rank, world_size", [(0, 1), (1, 2)])
def test_resume_continues_with_exactly_the_next_batch(shards, tokenizer, monkeypatch, rank, world_size):
    if world_size > 1:
        set_rank(monkeypatch, rank, world_size)
    B, T = 2, 8  # short rows: documents span batches, so states land mid-document
    K = len(expected_stream(tokenizer, "train", rank, world_size)) // (B * T + 1) + 10
    make = lambda state=None: tokenizing_distributed_data_loader(
        B, T, "train", tokenizer_batch_size=3, device="cpu", resume_state_dict=state, tokenizer=tokenizer)
    reference = take(make(), K)
    assert reference[-1][2]["epoch"] >= 1  # the run crosses an epoch boundary
    assert any(state["token"] > 0 for _, _, state in reference)  # and stops inside documents
    for j in (0, 7, K // 2, K - 12, K - 3):
        state = json.loads(json.dumps(reference[j][2]))  # as stored in and read from meta json
        resumed = take(make(state), K - 1 - j)
        for (x, y, s), (x_ref, y_ref, s_ref) in zip(resumed, reference[j + 1:]):
            assert torch.equal(x, x_ref) and torch.equal(y, y_ref)
            assert s == s_ref


def test_resume_from_gathered_states_and_from_another_rank(shards, tokenizer, monkeypatch):
    B, T = 2, 8
    set_rank(monkeypatch, 1, 2)
    make = lambda state=None: tokenizing_distributed_data_loader(B, T, "train", device="cpu",
                                                                 resume_state_dict=state, tokenizer=tokenizer)
    reference = take(make(), 12)
    rank0_state = dict(reference[4][2], rank=0, row_group=0)  # shape of a state that rank 0 would save
    gathered = {"ranks": [rank0_state, reference[4][2]]}  # what gather_loader_state() gives under torchrun
    for (x, _, _), (x_ref, _, _) in zip(take(make(gathered), 7), reference[5:]):
        assert torch.equal(x, x_ref)
    # only rank 0's state (the reference's habit): approximate, starting at the next round of row groups
    inputs, _, state = next(make(rank0_state))
    assert state["row_group"] == 3 and state["shard"] == rank0_state["shard"]
    assert inputs[0, 0].item() == tokenizer.get_bos_token_id()
    assert gather_loader_state(reference[0][2]) == reference[0][2]  # single process: unchanged


def test_default_tokenizer_and_errors(shards, tokenizer, base_dir, monkeypatch):
    tokenizer.save(get_tokenizer_dir())
    x, _, _ = next(tokenizing_distributed_data_loader(1, 4, "train", device="cpu"))
    x_ref, _, _ = next(tokenizing_distributed_data_loader(1, 4, "train", device="cpu", tokenizer=tokenizer))
    assert torch.equal(x, x_ref)
    with pytest.raises(ValueError, match="split must be"):
        next(tokenizing_distributed_data_loader(1, 4, "test", device="cpu", tokenizer=tokenizer))
    set_rank(monkeypatch, 3, 4)  # the validation shard has 3 row groups: a 4th rank would get none
    with pytest.raises(ValueError, match="no row group for rank 3 of 4"):
        next(tokenizing_distributed_data_loader(1, 4, "val", device="cpu", tokenizer=tokenizer))
    monkeypatch.setenv("NANOCHAT_DATA_MAX_SHARD", "9")
    with pytest.raises(FileNotFoundError, match=r"python -m nanochat\.dataset"):
        next(tokenizing_distributed_data_loader(1, 4, "val", device="cpu", tokenizer=tokenizer))
