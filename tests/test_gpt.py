"""
The GPT model: sizes, init, causality, KV-cache equivalence, loss, generation, optimizer set-up.
All on CPU in fp32 with tiny models.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from nanochat.engine import KVCache
from nanochat.gpt import GPTConfig, build_gpt


def build(config, seed=0, randomize=True):
    """Meta-device build + init, as training does. randomize=True also fills the zero-initialised
    projections, so that every path through the network affects the logits."""
    torch.manual_seed(seed)
    model = build_gpt(config)
    if randomize:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "c_proj" in name or "lm_head" in name:
                    p.normal_(0, 0.5 / math.sqrt(p.size(1)))
    return model.eval()


TINY = GPTConfig(sequence_len=32, vocab_size=64, n_layer=2, n_head=4, n_kv_head=4, n_embd=32)
TINY_GQA = GPTConfig(sequence_len=32, vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32)


@pytest.mark.parametrize("sequence_len", [128, 2048])
def test_depth4_parameter_count_and_keys(sequence_len):
    config = GPTConfig(sequence_len=sequence_len, vocab_size=8192, n_layer=4, n_head=2, n_kv_head=2, n_embd=256)
    model = build(config, randomize=False)
    # wte + lm_head: 2 * 8192 * 256; per block: 4 * 256^2 (attention) + 2 * 256 * 1024 (MLP)
    assert sum(p.numel() for p in model.parameters()) == 7_340_032
    expected = ["transformer.wte.weight"]
    for i in range(4):
        expected += [f"transformer.h.{i}.attn.c_{n}.weight" for n in ("q", "k", "v", "proj")]
        expected += [f"transformer.h.{i}.mlp.c_{n}.weight" for n in ("fc", "proj")]
    expected.append("lm_head.weight")
    state = model.state_dict()
    assert list(state.keys()) == expected  # no rotary buffers in the checkpoint
    assert state["transformer.h.0.mlp.c_fc.weight"].shape == (1024, 256)
    assert state["lm_head.weight"].shape == (8192, 256)
    assert model.cos.shape == (1, 10 * sequence_len, 1, 128)  # [cos, cos] of each angle: see apply_rotary_emb


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_is_the_two_halves_formula_bit_for_bit(dtype):
    # x cos + roll(x) sin on the doubled tables gives the same numbers as rotating the two halves apart
    from nanochat.gpt import apply_rotary_emb
    model = build(GPTConfig(sequence_len=16, vocab_size=64, n_layer=1, n_head=2, n_kv_head=2, n_embd=32))
    x = torch.randn(2, 16, 3, 16, generator=torch.Generator().manual_seed(0)).to(dtype)
    cos, sin = model.cos[:, :16].to(dtype), model.sin[:, :16].to(dtype)
    half_cos, half_sin = cos[..., :8], sin[..., :8]
    x1, x2 = x[..., :8], x[..., 8:]
    halves = torch.cat([x1 * half_cos + x2 * half_sin, x1 * (-half_sin) + x2 * half_cos], dim=-1)
    assert torch.equal(apply_rotary_emb(x, cos, sin), halves)
    # compiled (another form of the swap), with the model's fp32 tables: x's products are exact in fp32 either way
    cos, sin = model.cos[:, :16], model.sin[:, :16]
    assert torch.equal(torch.compile(apply_rotary_emb, fullgraph=True)(x, cos, sin), apply_rotary_emb(x, cos, sin))


def test_init_and_flops():
    config = GPTConfig(sequence_len=64, vocab_size=512, n_layer=2, n_head=2, n_kv_head=2, n_embd=128)
    model = build(config, randomize=False)
    assert model.lm_head.weight.abs().max() == 0
    for block in model.transformer.h:
        assert block.attn.c_proj.weight.abs().max() == 0 and block.mlp.c_proj.weight.abs().max() == 0
    # std = 1/sqrt(fan_in) * min(1, sqrt(fan_out / fan_in)): square -> 1/sqrt(128); c_fc (512x128) -> 1/sqrt(128)
    assert abs(model.transformer.h[0].attn.c_q.weight.std().item() - 128 ** -0.5) < 0.005
    assert abs(model.transformer.h[0].mlp.c_fc.weight.std().item() - 128 ** -0.5) < 0.005
    assert abs(model.transformer.wte.weight.std().item() - 1.0) < 0.02
    n_params = sum(p.numel() for p in model.parameters())
    expected = 6 * (n_params - 512 * 128) + 12 * 2 * 2 * 64 * 64
    assert model.estimate_flops() == expected
    # a fresh model predicts the uniform distribution: lm_head starts at zero
    idx = torch.randint(0, 512, (2, 16))
    assert abs(model(idx, targets=idx).item() - math.log(512)) < 1e-5


@pytest.mark.parametrize("config", [TINY, TINY_GQA], ids=["mha", "gqa"])
def test_causality(config):
    model = build(config)
    idx = torch.randint(0, config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))
    t = 11
    changed = idx.clone()
    changed[:, t] = (changed[:, t] + 1) % config.vocab_size
    with torch.no_grad():
        a, b = model(idx), model(changed)
    assert torch.equal(a[:, :t], b[:, :t])  # nothing before t may see token t
    assert not torch.allclose(a[:, t:], b[:, t:])  # and it does matter from t on


@pytest.mark.parametrize("config", [TINY, TINY_GQA], ids=["mha", "gqa"])
@pytest.mark.parametrize("chunks", [[6] + [1] * 10, [5, 4, 3, 1, 1, 2], [1] * 8],
                         ids=["prefill+decode", "chunked", "decode-only"])
def test_kv_cache_matches_full_forward(config, chunks):
    model = build(config)
    B, T = 2, sum(chunks)
    idx = torch.randint(0, config.vocab_size, (B, T), generator=torch.Generator().manual_seed(2))
    head_dim = config.n_embd // config.n_head
    cache = KVCache(batch_size=B, num_heads=config.n_kv_head, seq_len=T, head_dim=head_dim, num_layers=config.n_layer)
    with torch.no_grad():
        full = model(idx)
        pieces, start = [], 0
        for n in chunks:
            pieces.append(model(idx[:, start:start + n], kv_cache=cache))
            start += n
    assert cache.get_pos() == T
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=2e-5, rtol=1e-5)


def test_loss_reduction_and_ignore_index():
    model = build(TINY)
    idx = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(3))
    targets = torch.roll(idx, -1, dims=1)
    targets[:, -3:] = -1  # ignored positions
    with torch.no_grad():
        per_token = model(idx, targets=targets, loss_reduction="none")
        mean = model(idx, targets=targets)
        logits = model(idx)
    assert per_token.shape == (24,) and logits.dtype == torch.float32
    assert torch.all(per_token.view(2, 12)[:, -3:] == 0)
    torch.testing.assert_close(mean, per_token.sum() / 18)
    torch.testing.assert_close(mean, F.cross_entropy(logits.view(-1, 64), targets.view(-1), ignore_index=-1))
    assert logits.abs().max() < 15  # soft-capped


def test_generate():
    model = build(TINY)
    prompt = [1, 2, 3]
    greedy = list(model.generate(prompt, max_tokens=5, temperature=0.0))
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(5):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert greedy == ids[3:]
    sample_a = list(model.generate(prompt, max_tokens=6, temperature=1.0, top_k=5, seed=7))
    sample_b = list(model.generate(prompt, max_tokens=6, temperature=1.0, top_k=5, seed=7))
    assert sample_a == sample_b and all(0 <= t < 64 for t in sample_a)


def test_setup_optimizers_groups_and_lrs():
    config = GPTConfig(sequence_len=32, vocab_size=64, n_layer=2, n_head=2, n_kv_head=2, n_embd=64)
    model = build(config, randomize=False)
    adamw, muon = model.setup_optimizers(unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02, weight_decay=0.0)
    assert isinstance(adamw, torch.optim.AdamW)
    scale = (64 / 768) ** -0.5
    lm_head_group, embedding_group = adamw.param_groups
    assert lm_head_group["params"] == [model.lm_head.weight]
    assert embedding_group["params"] == [model.transformer.wte.weight]
    assert lm_head_group["lr"] == pytest.approx(0.004 * scale) and embedding_group["lr"] == pytest.approx(0.2 * scale)
    assert lm_head_group["betas"] == (0.8, 0.95) and lm_head_group["eps"] == 1e-10
    muon_params = [p for g in muon.param_groups for p in g["params"]]
    assert {id(p) for p in muon_params} == {id(p) for p in model.transformer.h.parameters()}
    for group in muon.param_groups:
        assert len({p.shape for p in group["params"]}) == 1  # one shape per group
        assert group["momentum"] == 0.95
    for opt in (adamw, muon):
        for group in opt.param_groups:
            assert group["initial_lr"] == group["lr"]


@pytest.mark.parametrize("n_kv_head, prefix, T", [(4, 0, 96), (2, 0, 96), (2, 40, 96), (2, 7, 50)])
def test_explicit_cpu_attention_is_as_accurate_as_sdpa_in_bf16(n_kv_head, prefix, T, monkeypatch):
    # prefix: keys and values before the queries' own (a cache, or the prompt the RL rows share), seen by all;
    # the queries in blocks of at least 16 (EXPLICIT_ATTENTION_MIN_BLOCK): T = 96 in 4 blocks of 24,
    # T = 50 in 17, 17, 16
    from nanochat import gpt
    monkeypatch.setattr(gpt, "EXPLICIT_ATTENTION_MIN_BLOCK", 16)
    g = torch.Generator().manual_seed(0)
    B, H, D = 2, 4, 64
    # unit-RMS rows, as after the model's QK norm
    q = F.rms_norm(torch.randn(B, H, T, D, generator=g), (D,))
    k = F.rms_norm(torch.randn(B, n_kv_head, prefix + T, D, generator=g), (D,)) * 3
    v = torch.randn(B, n_kv_head, prefix + T, D, generator=g)
    visible = torch.ones(T, prefix + T, dtype=torch.bool).tril(diagonal=prefix)
    grad_out = torch.randn(B, H, T, D, generator=g)
    gqa = n_kv_head != H

    def run(attention, dtype):
        inputs = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        out = attention(*inputs)
        out.backward(grad_out.to(dtype))
        return [out.double()] + [t.grad.double() for t in inputs]

    exact = run(lambda *t: F.scaled_dot_product_attention(*t, attn_mask=visible, enable_gqa=gqa), torch.float64)
    sdpa = run(lambda *t: F.scaled_dot_product_attention(*t, attn_mask=visible, enable_gqa=gqa), torch.bfloat16)
    sdpa_calls = []
    monkeypatch.setattr(gpt.F, "scaled_dot_product_attention", lambda *a, **kw: sdpa_calls.append(1))
    explicit = run(lambda *t: gpt.causal_attention(*t, enable_gqa=gqa), torch.bfloat16)
    assert not sdpa_calls  # bf16 on CPU, small: the explicit route
    for name, e, s, x in zip(("out", "dq", "dk", "dv"), exact, sdpa, explicit):
        error = lambda a: ((a - e).norm() / e.norm()).item()
        assert error(x) < 2 * error(s) + 1e-3, f"{name}: explicit {error(x):.2e}, SDPA in bf16 {error(s):.2e}"
        assert error(x) < 1e-2, name


def test_attention_goes_to_sdpa_for_fp32_and_large_problems(monkeypatch):
    from nanochat import gpt
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 16, 8, generator=g) for _ in range(3))
    # fp32 (the reference's numerics): exactly SDPA
    assert torch.equal(gpt.causal_attention(q, k, v, enable_gqa=False),
                       F.scaled_dot_product_attention(q, k, v, is_causal=True))
    # with the first 6 keys a prefix every query sees
    visible = torch.ones(10, 16, dtype=torch.bool).tril(diagonal=6)
    assert torch.equal(gpt.causal_attention(q[:, :, 6:], k, v, enable_gqa=False),
                       F.scaled_dot_product_attention(q[:, :, 6:], k, v, attn_mask=visible))
    sdpa_calls = []
    real_sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(gpt.F, "scaled_dot_product_attention",
                        lambda *a, **kw: sdpa_calls.append(1) or real_sdpa(*a, **kw))
    qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16()
    gpt.causal_attention(qb, kb, vb, enable_gqa=False)
    assert not sdpa_calls
    monkeypatch.setattr(gpt, "EXPLICIT_ATTENTION_MAX_SCORES", 2 * 16 * 16 - 1)  # one score too many
    gpt.causal_attention(qb, kb, vb, enable_gqa=False)
    assert sdpa_calls == [1]


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_one_query_attention_written_out_equals_sdpa(n_kv_head):
    # the compiled CPU decode step's attention: query heads grouped per shared key/value head as SDPA's GQA does
    from nanochat import gpt
    g = torch.Generator().manual_seed(2)
    B, H, T, D = 3, 4, 37, 16
    q = torch.randn(B, 1, H, D, generator=g).transpose(1, 2)  # (B, H, 1, D) strided as in the model
    k, v = (torch.randn(B, n_kv_head, T, D, generator=g) for _ in range(2))
    expected = F.scaled_dot_product_attention(q, k, v, enable_gqa=n_kv_head != H)
    torch.testing.assert_close(gpt.attend_one_query(q, k, v), expected, rtol=1e-5, atol=1e-6)


def test_last_only_logits_are_the_last_position_of_the_full_forward():
    model = build(TINY)
    idx = torch.randint(0, TINY.vocab_size, (3, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(idx)
        last = model(idx, last_only=True)
        cache = KVCache(3, TINY.n_kv_head, 32, TINY.n_embd // TINY.n_head, TINY.n_layer)
        prefill = model(idx, kv_cache=cache, last_only=True)
    assert last.shape == prefill.shape == (3, 1, TINY.vocab_size)
    torch.testing.assert_close(last, full[:, -1:], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(prefill, full[:, -1:], rtol=1e-6, atol=1e-6)
    assert cache.get_pos() == 20  # the cache still holds every position


def test_logits_at_given_positions_are_those_of_the_full_forward():
    # chat_eval's padded batches: one position per row, each row's last prompt token
    model = build(TINY)
    idx = torch.randint(0, TINY.vocab_size, (4, 20), generator=torch.Generator().manual_seed(3))
    positions = torch.tensor([19, 0, 7, 12])
    with torch.no_grad():
        full = model(idx)
        picked = model(idx, positions=positions)
    assert picked.shape == (4, 1, TINY.vocab_size)
    torch.testing.assert_close(picked[:, 0], full[torch.arange(4), positions], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(picked[1, 0], picked[0, 0])  # rows read different positions


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("attention", ["explicit", "sdpa"])
def test_backward_keeps_no_more_memory_than_it_reads(dtype, attention, monkeypatch):
    # Every tensor autograd saves for the backward pass is read there; one that is a view into a larger tensor keeps
    # all of it alive until then (v as a slice of q, k and v side by side: +(B, T, 2C) per layer, 6.7 GB at depth
    # 20 and 32 x 2048 tokens per step). Each storage kept, other than the model's own weights and tables, must be
    # covered by the saved views of it.
    from nanochat import gpt
    if attention == "sdpa":  # the kernel CUDA takes; CPU's explicit bf16 attention otherwise
        monkeypatch.setattr(gpt, "EXPLICIT_ATTENTION_MAX_SCORES", 0)
    model = build(TINY_GQA).train()
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    covered = {}  # storage -> (its element count, the flat elements the saved views of it cover)

    def keep(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in own and t.numel():
            numel, elements = covered.setdefault(storage.data_ptr(), (storage.nbytes() // t.element_size(), set()))
            flat = torch.arange(numel).as_strided(t.shape, t.stride(), t.storage_offset())
            elements.update(flat.flatten().tolist())
        return t

    idx = torch.randint(0, TINY_GQA.vocab_size, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        loss = model(idx, targets=idx)
    loss.backward()
    assert covered
    for numel, elements in covered.values():
        assert len(elements) == numel
