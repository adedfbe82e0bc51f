"""
Bits per byte: closed form for a model with all-equal logits, exclusion of ignored targets and
special tokens, and the same number from 2 ranks as from one process.
"""

import math
import os

import pytest
import torch
import torch.nn.functional as F

from nanochat.loss_eval import evaluate_bpb

V = 64
SPECIAL_IDS = [60, 61, 62, 63]  # 0 bytes, like <|bos|> and friends


def make_token_bytes():
    g = torch.Generator().manual_seed(0)
    token_bytes = torch.randint(1, 5, (V,), generator=g, dtype=torch.int32)
    token_bytes[SPECIAL_IDS] = 0
    return token_bytes


def make_batches(num_batches, B=3, T=16, seed=0):
    """(inputs, targets, state) triples like the data loader's; targets hold ignored (-1) and special ids."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for i in range(num_batches):
        x = torch.randint(0, V, (B, T), generator=g)
        y = torch.randint(0, V, (B, T), generator=g)
        y[0, :5] = -1  # e.g. masked prompt tokens
        y[1, 3] = SPECIAL_IDS[0]
        y[2, -2:] = SPECIAL_IDS[1]
        batches.append((x, y, {"batch": i}))
    return batches


def closed_form_bpb(batches, token_bytes):
    """Uniform over V: every counted target costs ln(V) nats."""
    counted, total_bytes = 0, 0
    for _, y, _ in batches:
        for t in y.view(-1).tolist():
            if t >= 0 and token_bytes[t] > 0:
                counted += 1
                total_bytes += int(token_bytes[t])
    return counted * math.log(V) / (math.log(2) * total_bytes)


class UniformModel(torch.nn.Module):
    """All logits equal, with the GPT's loss interface (ignore_index=-1)."""

    def get_device(self):
        return torch.device("cpu")

    def forward(self, idx, targets, loss_reduction="mean"):
        logits = torch.zeros(*idx.shape, V)
        return F.cross_entropy(logits.view(-1, V), targets.view(-1), ignore_index=-1,
                               reduction=loss_reduction).view(idx.shape)


def tiny_gpt(uniform):
    """A 1-layer GPT, the same weights in every process; uniform=True zeroes the head (all logits 0)."""
    from nanochat.gpt import GPTConfig, build_gpt

    torch.manual_seed(0)
    config = GPTConfig(sequence_len=16, vocab_size=V, n_layer=1, n_head=2, n_kv_head=2, n_embd=32)
    model = build_gpt(config)
    with torch.no_grad():
        if uniform:
            model.lm_head.weight.zero_()
        else:
            model.lm_head.weight.normal_(std=0.5, generator=torch.Generator().manual_seed(1))
    return model


def test_uniform_model_matches_closed_form():
    token_bytes = make_token_bytes()
    batches = make_batches(4)
    expected = closed_form_bpb(batches, token_bytes)
    assert evaluate_bpb(UniformModel(), batches, 4, token_bytes) == pytest.approx(expected, rel=1e-6)
    # only the first `steps` batches count
    expected = closed_form_bpb(batches[:1], token_bytes)
    assert evaluate_bpb(UniformModel(), batches, 1, token_bytes) == pytest.approx(expected, rel=1e-6)


def test_real_gpt_with_uniform_logits_matches_closed_form():
    token_bytes = make_token_bytes()
    batches = make_batches(2)
    model = tiny_gpt(uniform=True)
    expected = closed_form_bpb(batches, token_bytes)
    assert evaluate_bpb(model, batches, 2, token_bytes) == pytest.approx(expected, rel=1e-6)


def test_real_gpt_matches_the_loss_of_its_full_logits(monkeypatch):
    """The GPT's chunked per-token loss gives the bpb of F.cross_entropy over its full logits."""
    import nanochat.loss
    monkeypatch.setattr(nanochat.loss, "LOSS_MIN_ROWS", 5)  # several chunks per batch
    monkeypatch.setattr(nanochat.loss, "LOSS_CHUNK_LOGITS", 1)
    token_bytes = make_token_bytes()
    batches = make_batches(3)
    model = tiny_gpt(uniform=False)
    nats, num_bytes = 0.0, 0
    with torch.no_grad():
        for x, y, _ in batches:
            losses = F.cross_entropy(model(x).view(-1, V), y.view(-1), ignore_index=-1, reduction="none")
            counted = (y.view(-1) >= 0) & (token_bytes[y.view(-1).clamp(min=0)] > 0)
            nats += losses[counted].sum().item()
            num_bytes += int(token_bytes[y.view(-1)[counted]].sum())
    assert evaluate_bpb(model, batches, 3, token_bytes) == pytest.approx(nats / (math.log(2) * num_bytes), rel=1e-5)


def test_excluded_targets_do_not_change_bpb():
    """Turning a counted target into an ignored or special one removes exactly its nats and bytes."""
    token_bytes = make_token_bytes()
    x = torch.zeros(1, 4, dtype=torch.long)
    y_plain = torch.tensor([[1, 2, 3, 4]])
    y_mixed = torch.tensor([[1, -1, SPECIAL_IDS[0], 4]])
    bpb_mixed = evaluate_bpb(UniformModel(), [(x, y_mixed)], 1, token_bytes)
    expected = 2 * math.log(V) / (math.log(2) * int(token_bytes[1] + token_bytes[4]))
    assert bpb_mixed == pytest.approx(expected, rel=1e-6)
    assert evaluate_bpb(UniformModel(), [(x, y_plain)], 1, token_bytes) == pytest.approx(
        4 * math.log(V) / (math.log(2) * int(token_bytes[1:5].sum())), rel=1e-6)
    # nothing countable at all
    assert evaluate_bpb(UniformModel(), [(x, torch.full((1, 4), -1))], 1, token_bytes) == float("inf")


def _bpb_worker(rank, world_size, init_file, queue):
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    model = tiny_gpt(uniform=False)
    batches = make_batches(4)[rank::world_size]  # each rank its own half
    queue.put((rank, evaluate_bpb(model, batches, 2, make_token_bytes())))
    dist.barrier()  # leave together: a rank exiting while the other still talks to it can abort in gloo
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_give_the_single_process_result(run_two_ranks):
    results = run_two_ranks(_bpb_worker)
    model = tiny_gpt(uniform=False)
    single = evaluate_bpb(model, make_batches(4), 4, make_token_bytes())
    assert results[0] == pytest.approx(single, rel=1e-5) and results[1] == results[0]
