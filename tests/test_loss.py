"""
The chunked loss (nanochat/loss.py, softcap_cross_entropy) against the plain path: the full logits, then
F.cross_entropy. Values and gradients, fp32, fp64 gradcheck, bf16 autocast, compiled, and under DDP.
"""

import pytest
import torch
import torch.nn.functional as F

import nanochat.loss as loss_module
from nanochat.gpt import GPTConfig
from nanochat.loss import softcap_cross_entropy
from test_gpt import build

LOSS_CONFIG = GPTConfig(sequence_len=32, vocab_size=96, n_layer=2, n_head=4, n_kv_head=2, n_embd=32)


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 7 rows, so a batch takes several chunks and the last one is shorter."""
    monkeypatch.setattr(loss_module, "LOSS_CHUNK_LOGITS", 1)
    monkeypatch.setattr(loss_module, "LOSS_MIN_ROWS", 7)


def loss_batch(seed=4, B=3, T=20, V=96):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, V, (B, T), generator=g)
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[0, :5] = -1  # ignored positions, e.g. a masked prompt
    targets[2, -1] = -1
    return idx, targets


def plain_loss(model, idx, targets, reduction="mean"):
    logits = model(idx)
    return F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.view(-1), ignore_index=-1, reduction=reduction)


def loss_and_grads(model, loss_fn, bf16=False, grad_output=None):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = loss_fn()
    loss.backward(grad_output)
    return loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])


def relative_error(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_chunked_loss_and_grads_match_the_plain_path_fp32(small_chunks, reduction):
    model = build(LOSS_CONFIG, seed=1)
    idx, targets = loss_batch()
    grad_output = torch.rand(idx.numel()) if reduction == "none" else None  # per-token weights
    ours, ours_grads = loss_and_grads(model, lambda: model(idx, targets, loss_reduction=reduction), grad_output=grad_output)
    plain, plain_grads = loss_and_grads(model, lambda: plain_loss(model, idx, targets, reduction), grad_output=grad_output)
    torch.testing.assert_close(ours, plain, rtol=1e-5, atol=1e-6)
    assert relative_error(ours_grads, plain_grads) < 1e-5
    torch.testing.assert_close(ours_grads, plain_grads, rtol=1e-5, atol=1e-5 * plain_grads.abs().max().item())
    if reduction == "none":
        assert torch.all(ours.view(idx.shape)[0, :5] == 0) and ours[-1] == 0  # ignored targets cost nothing
    with torch.no_grad():  # the path without autograd (evaluation) gives the same numbers
        torch.testing.assert_close(model(idx, targets, loss_reduction=reduction), ours, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("softcap", [15.0, 200.0])
def test_chunked_loss_of_large_logits_is_finite_and_exact(small_chunks, softcap):
    """Logits near the cap: at 15 the sum of exps is taken without a max (it cannot overflow); at 200, exp(cap)
    overflows fp32, so the max must come first. Either way the plain path's loss and gradients."""
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(20, 8, generator=g) * 40).requires_grad_()
    weight = torch.randn(96, 8, generator=g).requires_grad_()
    targets = torch.randint(0, 96, (20,), generator=g)
    ours = softcap_cross_entropy(x, weight, targets, softcap)
    ours_grads = torch.autograd.grad(ours, (x, weight))
    logits = softcap * torch.tanh(x @ weight.t() / softcap)
    assert logits.max() > 0.9 * softcap  # the test reaches the cap
    plain = F.cross_entropy(logits, targets)
    plain_grads = torch.autograd.grad(plain, (x, weight))
    assert torch.isfinite(ours)
    torch.testing.assert_close(ours, plain, rtol=1e-5, atol=1e-5)
    for a, b in zip(ours_grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * b.abs().max().item())


def test_chunked_loss_gradcheck_fp64(small_chunks):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(17, 6, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(11, 6, dtype=torch.float64, generator=g).mul(3).requires_grad_()  # large logits: the cap matters
    targets = torch.randint(0, 11, (17,), generator=g)
    targets[3] = -1
    for reduction in ("mean", "sum", "none"):
        assert torch.autograd.gradcheck(lambda x, w: softcap_cross_entropy(x, w, targets, 2.0, reduction), (x, weight))
    with pytest.raises(ValueError, match="reduction"):
        softcap_cross_entropy(x, weight, targets, 2.0, "max")


def test_chunked_loss_under_bf16_is_as_close_to_fp32_as_the_plain_path(small_chunks):
    """bf16 autocast: per-token losses and gradients no further from fp32 than the plain path's (measured ~10% closer)."""
    model = build(LOSS_CONFIG, seed=2)
    idx, targets = loss_batch(seed=6, B=4, T=32)
    fp32_losses, fp32_grads = loss_and_grads(model, lambda: model(idx, targets, loss_reduction="none"),
                                             grad_output=torch.ones(idx.numel()))
    ours_losses, ours_grads = loss_and_grads(model, lambda: model(idx, targets, loss_reduction="none"), bf16=True,
                                             grad_output=torch.ones(idx.numel()))
    plain_losses, plain_grads = loss_and_grads(model, lambda: plain_loss(model, idx, targets, "none"), bf16=True,
                                               grad_output=torch.ones(idx.numel()))
    assert ours_losses.dtype == torch.float32
    assert relative_error(ours_losses, fp32_losses) <= 1.05 * relative_error(plain_losses, fp32_losses)
    assert relative_error(ours_grads, fp32_grads) <= 1.05 * relative_error(plain_grads, fp32_grads)
    _, ours_mean_grads = loss_and_grads(model, lambda: model(idx, targets), bf16=True)  # the training path
    _, plain_mean_grads = loss_and_grads(model, lambda: plain_loss(model, idx, targets), bf16=True)
    _, fp32_mean_grads = loss_and_grads(model, lambda: model(idx, targets))
    assert relative_error(ours_mean_grads, fp32_mean_grads) <= 1.05 * relative_error(plain_mean_grads, fp32_mean_grads)


def test_compiled_chunked_loss_matches_eager(small_chunks):
    model = build(LOSS_CONFIG, seed=3)
    idx, targets = loss_batch(seed=7)
    eager, eager_grads = loss_and_grads(model, lambda: model(idx, targets))
    compiled_model = torch.compile(model, dynamic=False)
    compiled, compiled_grads = loss_and_grads(model, lambda: compiled_model(idx, targets))
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    assert relative_error(compiled_grads, eager_grads) < 1e-5
    with torch.no_grad():  # evaluation through the compiled model: per-token losses
        torch.testing.assert_close(compiled_model(idx, targets, loss_reduction="none"),
                                   plain_loss(model, idx, targets, "none"), rtol=1e-5, atol=1e-5)


def _ddp_worker(rank, world_size, init_file, queue):
    import os
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    loss_module.LOSS_CHUNK_LOGITS, loss_module.LOSS_MIN_ROWS = 1, 7
    model = build(LOSS_CONFIG, seed=1)
    idx, targets = loss_batch(seed=8, B=4)
    ddp_model = DistributedDataParallel(model)
    ddp_model(idx[2 * rank:2 * rank + 2], targets[2 * rank:2 * rank + 2]).backward()  # each rank half the batch
    # sent as a list: a shared-memory tensor would need this process alive until the parent reads it
    queue.put((rank, torch.cat([p.grad.flatten() for p in model.parameters()]).tolist()))
    del ddp_model  # its reducer goes before the group it talks through (a worker once aborted at exit in the suite)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
def test_chunked_loss_under_ddp_gives_the_average_gradient(run_two_ranks):
    results = run_two_ranks(_ddp_worker)
    model = build(LOSS_CONFIG, seed=1)
    idx, targets = loss_batch(seed=8, B=4)
    halves = []
    for rank in range(2):
        _, grads = loss_and_grads(model, lambda: plain_loss(model, idx[2 * rank:2 * rank + 2], targets[2 * rank:2 * rank + 2]))
        halves.append(grads)
    expected = (halves[0] + halves[1]) / 2  # DDP averages over ranks
    for rank in range(2):
        assert relative_error(torch.tensor(results[rank]), expected) < 1e-5


