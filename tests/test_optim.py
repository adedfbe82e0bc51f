"""
Muon's Newton-Schulz orthogonalisation and update rule, and the distributed optimizers: one step on
2 gloo processes must give the same weights as one process on the concatenated batch.
"""

import math
import os
import platform
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nanochat import collectives
from nanochat.gpt import GPTConfig, build_gpt
from nanochat.muon import Muon, newton_schulz
from nanochat.adamw import DistAdamW

DTYPES = [torch.float32, torch.bfloat16]


def random_with_singular_values(rows, cols, singular_values, seed):
    """U diag(s) V^T with random orthonormal U, V; also returns U V^T, the exact orthogonalisation."""
    g = torch.Generator().manual_seed(seed)
    k = min(rows, cols)
    U, _ = torch.linalg.qr(torch.randn(rows, k, generator=g))
    V, _ = torch.linalg.qr(torch.randn(cols, k, generator=g))
    return U @ torch.diag(singular_values) @ V.T, U @ V.T


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(64, 256), (256, 64), (96, 96), (128, 48)], ids=["wide", "tall", "square", "tall2"])
def test_newton_schulz_singular_value_band(shape, dtype):
    rows, cols = shape
    # singular values spread over 1.5 decades, so the small ones need the full 5 steps
    s = torch.logspace(0, -1.5, min(rows, cols)) * 7.0
    G, exact = random_with_singular_values(rows, cols, s, seed=rows + cols)
    X = newton_schulz(G, steps=5, dtype=dtype)
    assert X.dtype == dtype and X.shape == G.shape
    sv = torch.linalg.svdvals(X.float())
    assert sv.min() > 0.5 and sv.max() < 1.5, (sv.min().item(), sv.max().item())
    # same singular vectors as G: close to U V^T (cosine similarity)
    cosine = (X.float() * exact).sum() / (X.float().norm() * exact.norm())
    assert cosine > 0.95


@pytest.mark.parametrize("shape", [(2, 24, 40), (40, 24)])
def test_newton_schulz_is_the_quintic_iteration_written_out(shape):
    # in fp64 the fused matmuls give the textbook steps: B = b A + c A A, X = a X + B X with A = X X^T
    from nanochat.muon import NS_COEFFS
    a, b, c = NS_COEFFS
    G = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    X = G.mT if shape[-2] > shape[-1] else G
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(5):
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    X = X.mT if shape[-2] > shape[-1] else X
    torch.testing.assert_close(newton_schulz(G, dtype=torch.float64), X, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shape", [(3, 48, 96), (2, 96, 48), (300, 100)])
def test_newton_schulz_random_rectangular(shape):
    # Gaussian matrices with aspect ratio >= 2 are well conditioned: every singular value lands in the band
    G = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    for dtype in DTYPES:
        sv = torch.linalg.svdvals(newton_schulz(G, dtype=dtype).float())
        assert sv.min() > 0.5 and sv.max() < 1.5
    # a batched call is the same as one call per matrix
    if G.ndim == 3:
        one_by_one = torch.stack([newton_schulz(g, dtype=torch.float32) for g in G])
        torch.testing.assert_close(newton_schulz(G, dtype=torch.float32), one_by_one, atol=1e-6, rtol=1e-5)


def test_muon_update_rule_and_grouping():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(*s)) for s in [(32, 16), (16, 32), (32, 16), (16, 16)]]
    opt = Muon(params, lr=0.1, momentum=0.9, nesterov=True)
    opt.ns_dtype = torch.float32
    assert sorted(len(g["params"]) for g in opt.param_groups) == [1, 1, 2]  # grouped by shape
    before = [p.detach().clone() for p in params]
    bufs = [torch.zeros_like(p) for p in params]
    for step in range(2):
        grads = [torch.randn_like(p) for p in params]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        for i, (p, g) in enumerate(zip(params, grads)):
            bufs[i] = 0.9 * bufs[i] + 0.1 * g
            nesterov = 0.1 * g + 0.9 * bufs[i]
            rows, cols = p.shape
            before[i] -= 0.1 * math.sqrt(max(1, rows / cols)) * newton_schulz(nesterov, dtype=torch.float32)
            torch.testing.assert_close(p.detach(), before[i], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(p.grad, g)  # Muon leaves .grad alone


# --------------------------------------------------------------------------------------------------
# Distributed: 2 gloo processes vs 1 process

WORLD_SIZE = 2
BATCH, SEQ = 4, 16  # the global batch; each rank gets BATCH // WORLD_SIZE rows
STEPS = 2  # the second step exercises the sharded momentum / Adam state
# n_layer=3: each Muon shape group has 3 matrices, so ownership is uneven (2 + 1) and padded
CONFIG = GPTConfig(sequence_len=SEQ, vocab_size=96, n_layer=3, n_head=2, n_kv_head=1, n_embd=64)


def make_model():
    torch.manual_seed(0)
    model = build_gpt(CONFIG)
    with torch.no_grad():  # fill the zero-initialised projections so every matrix gets a gradient at step 1
        for name, p in model.named_parameters():
            if "c_proj" in name or "lm_head" in name:
                p.normal_(0, 0.5 / math.sqrt(p.size(1)))
    return model


def make_batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, CONFIG.vocab_size, (BATCH, SEQ + 1), generator=g) for _ in range(STEPS)]


def train(model, batches, rows):
    """STEPS optimisation steps of every rank's slice `rows` of each batch; returns the final state_dict."""
    adamw, muon = model.setup_optimizers(weight_decay=0.1)
    muon.ns_dtype = torch.float32  # fp32 so that the comparison can be tight
    for batch in batches:
        batch = batch[rows]
        loss = model(batch[:, :-1], targets=batch[:, 1:])
        loss.backward()
        for opt in (adamw, muon):
            opt.step()
        model.zero_grad(set_to_none=True)
    return {k: v.clone() for k, v in model.state_dict().items()}


def odd_shape_adamw_step(rank, world_size):
    """DistAdamW on a parameter whose dim 0 does not divide by the world size (the replicated path)."""
    g = torch.Generator().manual_seed(5)
    p = torch.nn.Parameter(torch.randn(5, 3, generator=g))
    grads = torch.randn(world_size, 5, 3, generator=g)
    opt = DistAdamW([p], lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1)
    p.grad = grads[rank].clone()
    opt.step()
    return p.detach().clone()


def dist_worker(rank, store_path, out_path):
    torch.set_num_threads(1)
    # rendezvous through a file: no port to pick, so nothing can race us for it
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=WORLD_SIZE)
    try:
        per_rank = BATCH // WORLD_SIZE
        rows = slice(rank * per_rank, (rank + 1) * per_rank)
        results = {"native": train(make_model(), make_batches(), rows)}
        collectives._native_reduce_scatter = False  # the all_reduce + slice fallback (backends without reduce_scatter)
        results["fallback"] = train(make_model(), make_batches(), rows)
        results["odd"] = odd_shape_adamw_step(rank, WORLD_SIZE)
        if rank == 0:
            torch.save(results, out_path)
        dist.barrier()  # leave together: a rank exiting while the other still talks to it can abort in gloo
    finally:
        dist.destroy_process_group()
    # Skip the interpreter's teardown: gloo's threads can abort a finished rank there (std::terminate,
    # once in a full CI run under load), after the results are saved. Errors above still raise.
    sys.stdout.flush()
    os._exit(0)


@pytest.mark.slow
def test_distributed_step_matches_single_process(tmp_path):
    out_path = str(tmp_path / "dist.pt")
    mp.spawn(dist_worker, args=(str(tmp_path / "store"), out_path), nprocs=WORLD_SIZE, join=True)
    results = torch.load(out_path)

    expected = train(make_model(), make_batches(), slice(None))  # torch AdamW + Muon, whole batch
    # Gradients are averaged in a different order (two half-batch means vs one full mean), so weights
    # agree to float rounding, amplified by the large embedding LR (0.2 * (64/768)^-0.5 = 0.69).
    for mode in ("native", "fallback"):
        for name, value in expected.items():
            torch.testing.assert_close(results[mode][name], value, atol=1e-5, rtol=1e-5, msg=f"{mode} {name}")
        name = "transformer.h.0.attn.c_q.weight"
        assert not torch.equal(results[mode][name], make_model().state_dict()[name])

    g = torch.Generator().manual_seed(5)
    p = torch.nn.Parameter(torch.randn(5, 3, generator=g))
    p.grad = torch.randn(WORLD_SIZE, 5, 3, generator=g).mean(0)
    torch.optim.AdamW([p], lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1).step()
    torch.testing.assert_close(results["odd"], p.detach(), atol=1e-6, rtol=1e-6)


FAULTS_PER_TRAINING_STEP = """
import resource, torch
from nanochat import hardware
w = torch.randn(1024, 1024, requires_grad=True)
x = torch.randn(2048, 1024)
def step():  # 8 MB tensors, allocated and freed again at each step
    (torch.relu(x @ w) @ w).square().mean().backward()
    w.grad = None
for keep in (False, True):
    assert hardware.keep_freed_memory(keep)
    for _ in range(3):
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        step()
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 5)
"""


def transparent_huge_pages_always():
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[always]" in f.read()
    except OSError:
        return False


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc")
@pytest.mark.skipif(transparent_huge_pages_always(), reason="huge pages: a few faults either way")
def test_kept_freed_memory_is_reused_without_page_faults():
    # In a process of its own: the malloc settings are process-wide
    result = subprocess.run([sys.executable, "-c", FAULTS_PER_TRAINING_STEP], capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert result.returncode == 0, result.stderr
    handed_back, kept = map(int, result.stdout.split())
    # handed back, the step's 8 MB tensors come back as fresh 4 KB pages (~22,000 faults); kept, as reused ones
    assert handed_back >= 4096 and kept * 10 < handed_back, (handed_back, kept)


def test_precision_choice_follows_cpu_features(monkeypatch):
    from nanochat import hardware
    # without native bf16 the slow emulated path is never chosen, and nothing is measured
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    monkeypatch.setattr(hardware, "measure_matmul_flops", lambda *a, **k: pytest.fail("should not measure"))
    hardware._bf16_matmul_speedup.cache_clear()
    try:
        assert hardware.bf16_matmul_speedup("cpu") == 0.0
        assert hardware.newton_schulz_dtype("cpu") == torch.float32
        assert hardware.choose_autocast_dtype("cpu") is None
        # with native bf16 the decision follows the measurement
        monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
        speeds = {torch.float32: 1e11, torch.bfloat16: 3e11}
        monkeypatch.setattr(hardware, "measure_matmul_flops", lambda device, dtype, **k: speeds[dtype])
        hardware._bf16_matmul_speedup.cache_clear()
        assert hardware.bf16_matmul_speedup("cpu") == pytest.approx(3.0)
        assert hardware.newton_schulz_dtype("cpu") == torch.bfloat16
        assert hardware.choose_autocast_dtype("cpu") == torch.bfloat16
    finally:
        hardware._bf16_matmul_speedup.cache_clear()  # later tests measure the real machine again


def measure_by_rank_worker(rank, store_path, out_path):
    # rank 0 measures bf16 3x faster, rank 1 (say, while busy) 1.2x: both must take rank 0's figure, for training
    # and for decoding (RL rollouts); rank 1's CPU shows no bf16 units, and compiled decoding follows rank 0's
    from nanochat import decode, hardware
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=2)
    try:
        speeds = {torch.float32: 1e11, torch.bfloat16: (3e11, 1.2e11)[rank]}
        hardware.cpu_flags = lambda: frozenset({"avx512_bf16"} if rank == 0 else ())
        hardware.measure_matmul_flops = lambda device, dtype, **k: speeds[dtype]
        decode._measured_bf16_decode_speedup = lambda device: (3.0, 1.2)[rank]
        hardware._bf16_matmul_speedup.cache_clear()
        decode._bf16_decode_speedup.cache_clear()
        choices = (hardware.bf16_matmul_speedup("cpu"), str(hardware.newton_schulz_dtype("cpu")),
                   str(hardware.choose_autocast_dtype("cpu")), str(decode.choose_decode_dtype("cpu")),
                   str(decode.choose_decode_dtype("cpu", "compile")))
        gathered = [None, None]
        dist.all_gather_object(gathered, choices)
        if rank == 0:
            torch.save(gathered, out_path)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # as dist_worker: no interpreter teardown under gloo


def test_ranks_take_rank_zeros_precision_measurement(tmp_path):
    out_path = str(tmp_path / "choices.pt")
    mp.spawn(measure_by_rank_worker, args=(str(tmp_path / "store"), out_path), nprocs=2, join=True)
    rank0, rank1 = torch.load(out_path)
    assert rank0 == rank1 == (pytest.approx(3.0), "torch.bfloat16", "torch.bfloat16", "torch.bfloat16",
                              "torch.bfloat16")
