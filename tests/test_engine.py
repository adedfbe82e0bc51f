"""
Engine, KV cache and calculator: equivalence with no-cache decoding, shared prefill, seeds, tool use.
python -m pytest tests/test_engine.py -q
"""

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from nanochat import decode, hardware
from nanochat.calculator import use_calculator
from nanochat.decode import PreparedLinear, can_pack_weights, prepacked_linear, prepare_for_decoding, run_step
from nanochat.engine import Engine, KVCache
from nanochat.sampling import draw_one, sample_next_token
from nanochat.gpt import GPT, GPTConfig, build_gpt, soft_cap


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    # The models here are tiny: on a loaded 2-core machine, 2 torch threads spin-wait on each
    # other and were measured ~50x slower than 1 thread for this file.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# -----------------------------------------------------------------------------
# A tiny character-level tokenizer with the special tokens the Engine needs

SPECIALS = ["<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
            "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>"]
CHARS = "0123456789+-*/()'\". abcdefghijklmnopqrstuvwxyz_"


class CharTokenizer:
    def __init__(self):
        self.vocab = list(CHARS) + SPECIALS
        self.ids = {s: i for i, s in enumerate(self.vocab)}

    def encode_special(self, name):
        return self.ids[name]

    def get_bos_token_id(self):
        return self.ids["<|bos|>"]

    def get_vocab_size(self):
        return len(self.vocab)

    def encode(self, text):
        return [self.ids[c] for c in text]

    def decode(self, ids):
        return "".join(self.vocab[i] for i in ids)


# -----------------------------------------------------------------------------
# KV cache (storage) and the model's attention over it

def _attention(n_head=3, n_kv_head=3, head_dim=4, num_layers=2):
    """A model's attention modules: what reads and writes the cache."""
    config = GPTConfig(n_layer=num_layers, n_head=n_head, n_kv_head=n_kv_head, n_embd=n_head * head_dim)
    return [GPT(config).transformer.h[layer].attn for layer in range(num_layers)]


def _attend_all_layers(layers, cache, k, v, q=None):
    """One forward's worth of attention: the same q, k, v in every layer, then the model's advance of the
    position; returns the last layer's output."""
    q = k if q is None else q
    for attn in layers:
        y = attn.attend_with_cache(q, k, v, cache)
    cache.pos += k.size(2)
    return y


def _reference_attention(q, k, v):
    """Softmax attention of the last k.size(2) - q.size(2) cached positions plus causal within q."""
    Tq, Tk = q.size(2), k.size(2)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.size(-1))
    visible = torch.ones(Tq, Tk, dtype=torch.bool).tril(diagonal=Tk - Tq)
    return scores.masked_fill(~visible, float("-inf")).softmax(-1) @ v


def test_kv_cache_stores_and_returns_what_was_written():
    cache = KVCache(batch_size=2, num_heads=3, seq_len=8, head_dim=4, num_layers=2)
    k, v = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 4)
    keys, values = cache.insert(1, k, v)
    assert torch.equal(keys, k) and torch.equal(values, v) and cache.get_pos() == 0  # storing does not advance
    cache.pos = 5
    k2 = torch.randn(2, 3, 2, 4)
    keys, _ = cache.insert(1, k2, k2)
    assert torch.equal(keys, torch.cat([k, k2], 2))
    with pytest.raises(ValueError, match="cache holds"):
        cache.insert(0, torch.randn(2, 4, 1, 4), torch.randn(2, 4, 1, 4))


@pytest.mark.parametrize("n_kv_head", [3, 1], ids=["mha", "gqa"])
def test_attention_over_the_cache_sees_the_prefix_and_is_causal_within_a_chunk(n_kv_head):
    torch.manual_seed(0)
    layers = _attention(n_head=3, n_kv_head=n_kv_head)
    cache = KVCache(batch_size=2, num_heads=n_kv_head, seq_len=8, head_dim=4, num_layers=2)
    expand = lambda t: t.repeat_interleave(3 // n_kv_head, dim=1)  # each key/value head serves its query heads
    k, v, q = torch.randn(2, n_kv_head, 5, 4), torch.randn(2, n_kv_head, 5, 4), torch.randn(2, 3, 5, 4)
    y = _attend_all_layers(layers, cache, k, v, q)
    torch.testing.assert_close(y, _reference_attention(q, expand(k), expand(v)))
    assert cache.get_pos() == 5
    # a chunk of 2 after the 5 cached: sees all of them, causal within itself; then one token
    for T in (2, 1):
        k2, v2, q2 = torch.randn(2, n_kv_head, T, 4), torch.randn(2, n_kv_head, T, 4), torch.randn(2, 3, T, 4)
        y = _attend_all_layers(layers, cache, k2, v2, q2)
        k, v = torch.cat([k, k2], 2), torch.cat([v, v2], 2)
        torch.testing.assert_close(y, _reference_attention(q2, expand(k), expand(v)))
    assert cache.get_pos() == 8 and torch.equal(cache.k[1][:, :, :8], k) and torch.equal(cache.v[0][:, :, :8], v)
    cache.reset()
    assert cache.get_pos() == 0


def test_rotary_tables_continue_after_cached_positions():
    model = GPT(GPTConfig(sequence_len=4, n_layer=1, n_head=1, n_kv_head=1, n_embd=8))
    cos, sin = model.rotary_tables(3, 2)
    assert torch.equal(cos, model.cos[:, 3:5]) and torch.equal(sin, model.sin[:, 3:5])
    position = torch.tensor(3)  # a position held on the device: one token
    assert torch.equal(model.rotary_tables(position, 1)[0], model.cos[:, 3:4])
    with pytest.raises(ValueError, match="rotary table"):
        model.rotary_tables(39, 2)  # 10 x sequence_len positions


def test_kv_cache_grows_and_keeps_contents():
    cache = KVCache(batch_size=2, num_heads=3, seq_len=4, head_dim=5, num_layers=3)
    for t in range(5):  # the last one past the capacity
        for layer in range(3):
            cache.insert(layer, torch.full((2, 3, 1, 5), float(t)), torch.full((2, 3, 1, 5), -float(t)))
        cache.pos += 1
    assert cache.k[0].size(2) > 4 and cache.get_pos() == 5
    expected = torch.arange(5.0).view(1, 1, 5, 1).expand(2, 3, 5, 5)
    for layer in range(3):
        assert torch.equal(cache.k[layer][:, :, :5], expected) and torch.equal(cache.v[layer][:, :, :5], -expected)


def test_position_on_the_device_matches_an_int_position():
    # the form that compiled static steps and CUDA graphs run (position tensor, whole capacity, masked)
    torch.manual_seed(0)
    layers = _attention(n_head=2, n_kv_head=2)
    sliced = KVCache(batch_size=2, num_heads=2, seq_len=16, head_dim=4, num_layers=2, dtype=torch.float32)
    static = KVCache(batch_size=2, num_heads=2, seq_len=16, head_dim=4, num_layers=2, dtype=torch.float32)
    prompt_k, prompt_v = torch.randn(2, 2, 5, 4), torch.randn(2, 2, 5, 4)
    for cache in (sliced, static):
        _attend_all_layers(layers, cache, prompt_k, prompt_v)
    for layer in range(2):  # whatever the unwritten memory holds (here NaN), the static form must not see it
        static.k[layer][:, :, 5:] = float("nan")
        static.v[layer][:, :, 5:] = float("nan")
    static.hold_position_on_device()
    for _ in range(4):
        k, v, q = torch.randn(2, 2, 1, 4), torch.randn(2, 2, 1, 4), torch.randn(2, 2, 1, 4)
        torch.testing.assert_close(_attend_all_layers(layers, static, k, v, q),
                                   _attend_all_layers(layers, sliced, k, v, q))
        assert static.pos.item() == sliced.pos


def test_kv_cache_prefill_broadcasts_batch_one():
    torch.manual_seed(0)
    small = KVCache(batch_size=1, num_heads=2, seq_len=3, head_dim=4, num_layers=2)
    prompt = torch.randn(1, 2, 3, 4)
    for layer in range(2):
        small.insert(layer, prompt, 2 * prompt)
    small.pos = 3
    big = KVCache(batch_size=3, num_heads=2, seq_len=10, head_dim=4, num_layers=2)
    big.prefill(small)
    assert big.get_pos() == 3 and big.k[0].shape == (3, 2, 10, 4)
    for row in range(3):
        assert torch.equal(big.k[1][row, :, :3], prompt[0]) and torch.equal(big.v[1][row, :, :3], 2 * prompt[0])
    # rows diverge after the shared prefix
    new = torch.arange(3.0).view(3, 1, 1, 1).expand(3, 2, 1, 4)
    big.insert(0, new, new)
    assert torch.equal(big.k[0][:, :, 3:4], new)
    # a compiled CPU decode keeps its cache in bf16: the fp32 prefill is rounded once on the way in
    half = KVCache(batch_size=3, num_heads=2, seq_len=10, head_dim=4, num_layers=2)
    half.prefill(small, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and half.get_pos() == 3
    assert torch.equal(half.v[1][2, :, :3], (2 * prompt[0]).bfloat16())
    # incompatible shapes are refused with a message
    with pytest.raises(ValueError):
        KVCache(batch_size=3, num_heads=5, seq_len=10, head_dim=4, num_layers=2).prefill(small)
    with pytest.raises(ValueError):
        KVCache(batch_size=2, num_heads=2, seq_len=10, head_dim=4, num_layers=2).prefill(big)


# -----------------------------------------------------------------------------
# Engine on a small random GPT

def _small_gpt(vocab_size, seed=0):
    torch.manual_seed(seed)
    config = GPTConfig(sequence_len=64, vocab_size=vocab_size, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)
    model = build_gpt(config)
    # init_weights zeroes the output projections (all logits equal): randomise them, with a large
    # enough scale that greedy decoding does not collapse into one repeated token.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2 and not p.any():
                p.normal_(0.0, 3.0 / math.sqrt(p.size(1)))
            p.data = p.data.float()  # fp32 weights (buffers such as rotary tables keep the model's dtype)
    model.eval()
    return model


@pytest.fixture(scope="module")
def model_and_tokenizer():
    tokenizer = CharTokenizer()
    # the model's vocabulary is the characters only: it can never emit a special token, so these
    # tests check decoding itself; the tool and stop logic is tested with a scripted model below
    return _small_gpt(len(CHARS)), tokenizer


def _naive_decode(model, tokens, max_tokens, temperature=0.0, top_k=None, seed=42):
    """Decode by running the full sequence through the model at every step (no cache)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.tensor([tokens])
    with torch.no_grad():
        for _ in range(max_tokens):
            next_id = sample_next_token(model(ids)[:, -1], generator, temperature, top_k)  # (1, 1)
            ids = torch.cat([ids, next_id], dim=1)
    return ids[0, len(tokens):].tolist()


def _columns(engine, prompt, **kwargs):
    """Run generate and return the generated tokens as one list per sample."""
    columns = [col for col, _ in engine.generate(prompt, **kwargs)]
    return [list(row) for row in zip(*columns)]


def test_engine_greedy_matches_full_forward(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    prompt = tokenizer.encode("hello world 12")
    expected = _naive_decode(model, prompt, 40)
    assert len(set(expected)) > 5  # a meaningful sequence, not one token repeated
    assert _columns(Engine(model, tokenizer), prompt, max_tokens=40, temperature=0.0) == [expected]
    # the model's own no-cache generator agrees too
    assert list(model.generate(prompt, max_tokens=40, temperature=0.0)) == expected


def test_bf16_embedding_runs_outside_autocast_as_on_cuda():
    # On CUDA the embedding is kept in bf16 (init_weights, as the reference). The forward without autocast and
    # the Engine's default fp32 decode must still run there, and agree (runs/gpu_check.sh found both failing).
    model, tokenizer = _small_gpt(len(CHARS)), CharTokenizer()
    model.transformer.wte.to(dtype=torch.bfloat16)
    prompt = tokenizer.encode("hello world 12")
    expected = _naive_decode(model, prompt, 40)
    assert len(set(expected)) > 5
    assert _columns(Engine(model, tokenizer), prompt, max_tokens=40, temperature=0.0) == [expected]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # under autocast the forward is unchanged
        assert model(torch.tensor([prompt])).shape == (1, len(prompt), len(CHARS))


def test_engine_sampling_matches_full_forward(model_and_tokenizer):
    # same seed, same sampler: the cached and uncached logits must agree at every step
    model, tokenizer = model_and_tokenizer
    prompt = tokenizer.encode("the cat")
    for top_k in (None, 10):
        expected = _naive_decode(model, prompt, 40, temperature=1.0, top_k=top_k, seed=3)
        got = _columns(Engine(model, tokenizer), prompt, max_tokens=40, temperature=1.0, top_k=top_k, seed=3)
        assert got == [expected]


@pytest.mark.parametrize("rows,width,spread", [(1, 50, 1.0), (8, 50, 3.0), (8, 8192, 10.0), (3, 7, 0.0)])
def test_draw_one_is_torch_multinomials_draw(rows, width, spread):
    # the same token from the same generator state, and the generator left in the same state, over many draws;
    # spread 10 over 8192 logits makes many probabilities underflow to 0, spread 0 a uniform distribution
    probs = torch.softmax(torch.randn(rows, width, generator=torch.Generator().manual_seed(width)) * spread, dim=-1)
    ours, torchs = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    draws = [(draw_one(probs, ours), torch.multinomial(probs, 1, generator=torchs)) for _ in range(200)]
    assert all(torch.equal(a, b) for a, b in draws)
    assert len({tuple(a.flatten().tolist()) for a, _ in draws}) > 1  # random draws, not a constant
    assert torch.equal(ours.get_state(), torchs.get_state())


@pytest.mark.parametrize("temperature,top_k", [(0.0, None), (1.0, None), (0.7, 1), (1.0, 50), (1.3, 8192)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_capping_only_the_kept_logits_draws_what_capping_all_draws(temperature, top_k, dtype):
    # logits as a bf16 lm_head gives them (or the same values in fp32): many ties among the largest, which top-k
    # must order as it orders the capped ones; spread 10 puts the largest past the cap's bend (|x| > 15)
    raw = (torch.randn(8, 8192, generator=torch.Generator().manual_seed(5)) * 10).bfloat16().to(dtype)
    assert raw[0].max() > 30 and raw[0].topk(50).values.unique().numel() < 40  # ties in the top 50
    ours, everything = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    draws = [(sample_next_token(raw, ours, temperature, top_k, cap=soft_cap),
              sample_next_token(soft_cap(raw.float()), everything, temperature, top_k)) for _ in range(50)]
    assert all(torch.equal(a, b) for a, b in draws)
    assert len({tuple(a.flatten().tolist()) for a, _ in draws}) > (1 if temperature and top_k != 1 else 0)
    assert torch.equal(ours.get_state(), everything.get_state())


def test_engine_shared_prefill_batch(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    engine = Engine(model, tokenizer)
    prompt = tokenizer.encode("abc")
    single = _columns(engine, prompt, num_samples=1, max_tokens=20, temperature=0.0)[0]
    greedy = _columns(engine, prompt, num_samples=3, max_tokens=20, temperature=0.0)
    assert greedy == [single] * 3  # every row of a shared prefill decodes like a lone sample

    sampled = _columns(engine, prompt, num_samples=4, max_tokens=20, temperature=1.0, seed=7)
    assert len({row[0] for row in sampled}) > 1  # rows sample independently from the first token on
    assert _columns(engine, prompt, num_samples=4, max_tokens=20, temperature=1.0, seed=7) == sampled
    assert _columns(engine, prompt, num_samples=4, max_tokens=20, temperature=1.0, seed=8) != sampled

    top1 = _columns(engine, prompt, num_samples=2, max_tokens=20, temperature=1.0, top_k=1)
    assert top1 == [single] * 2  # top-1 sampling is greedy


def test_generate_batch_returns_prompt_plus_tokens(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    prompt = tokenizer.encode("xy")
    results, masks = Engine(model, tokenizer).generate_batch(prompt, num_samples=2, max_tokens=12, temperature=0.0)
    expected = _naive_decode(model, prompt, 12)
    assert results == [prompt + expected] * 2
    assert masks == [[0] * len(prompt) + [1] * 12] * 2


def test_static_decode_form_matches_slices(model_and_tokenizer):
    # the form that "compile" and "cuda_graph" run (position tensor, whole capacity, masked), here uncompiled
    model, tokenizer = model_and_tokenizer
    prompt = torch.tensor([tokenizer.encode("hello there")] * 3)
    decoder = prepare_for_decoding(model, torch.float32, eager=False)
    caches = [KVCache(3, model.config.n_kv_head, 64, 16, model.config.n_layer, dtype=torch.float32) for _ in range(2)]
    with torch.no_grad():
        for cache in caches:
            model(prompt, kv_cache=cache)
        caches[1].hold_position_on_device()
        ids = prompt[:, -1:]
        for _ in range(10):
            sliced = run_step(decoder, caches[0], ids)
            static = run_step(decoder, caches[1], ids)
            torch.testing.assert_close(static, sliced)
            ids = sliced.argmax(-1, keepdim=True)
    assert caches[1].pos.item() == caches[0].pos == prompt.size(1) + 10


@pytest.mark.parametrize("eager", [False, True], ids=["for-compiling", "eager"])
def test_prepared_copy_runs_the_models_forward_with_the_same_logits(model_and_tokenizer, eager):
    # the decode step is the model's own forward on a copy with q/k/v stacked: in fp32 the same numbers, also
    # when the eager copy's modules are called without nn.Module's dispatch; where that copy's fp32 matrices are
    # packed for oneDNN (MKL on its generic code), its sums are oneDNN's: equal up to fp32 rounding
    model, tokenizer = model_and_tokenizer
    exact = not (eager and can_pack_weights("cpu", torch.float32))
    tolerance = dict(rtol=0, atol=0) if exact else dict(rtol=1e-4, atol=1e-5)
    decoder = prepare_for_decoding(model, torch.float32, eager=eager)
    assert isinstance(decoder, GPT) and decoder.transformer.wte.weight is model.transformer.wte.weight
    assert (type(decoder) is GPT) != eager
    assert type(model) is GPT and model.transformer.h[0].attn.c_qkv is None  # the model itself is untouched
    idx = torch.tensor([tokenizer.encode("hello there you")])
    caches = [KVCache(1, model.config.n_kv_head, 64, 16, model.config.n_layer, dtype=torch.float32) for _ in range(2)]
    with torch.no_grad():
        for chunk in (idx[:, :9], idx[:, 9:10], idx[:, 10:11]):
            torch.testing.assert_close(decoder(chunk, kv_cache=caches[0]), model(chunk, kv_cache=caches[1]),
                                       **tolerance)


@pytest.mark.parametrize("vendor, generic", [("GenuineIntel", False), ("AuthenticAMD", True), (None, False)])
def test_fp32_decode_matrices_are_packed_where_mkl_runs_its_generic_code(monkeypatch, vendor, generic):
    fields = {"model name": "some CPU", **({"vendor_id": vendor} if vendor else {})}
    monkeypatch.setattr(hardware, "cpuinfo", lambda: fields)
    generic = generic and torch.backends.mkl.is_available()
    assert hardware.mkl_runs_generic_code() == generic
    packable = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    assert can_pack_weights("cpu", torch.float32) == (generic and packable)
    # bf16 is packed on every CPU whose oneDNN packs bf16
    assert can_pack_weights("cpu", torch.bfloat16) == (packable and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    model = _small_gpt(len(CHARS))
    kinds = {linear.pack for linear in prepare_for_decoding(model, torch.float32, eager=True).modules()
             if isinstance(linear, PreparedLinear)}
    assert kinds == {"eager" if generic and packable else None}
    # live weights (compiled RL rollouts) likewise, through prepacked_linear
    live = prepare_for_decoding(model, torch.float32, eager=False, live=True)
    assert {linear.pack for linear in live.modules() if isinstance(linear, PreparedLinear)} == {
        "live" if generic and packable else None}


def test_bf16_decoding_runs_where_onednn_cannot_pack_bf16():
    # oneDNN packs bf16 weights only with AVX512 (BW, VL, DQ) or AVX-NE-CONVERT and raises elsewhere: there the
    # decode copy keeps plain bf16 matrices. ONEDNN_MAX_CPU_ISA=AVX2 makes any x86 CPU such a one for oneDNN.
    script = textwrap.dedent("""
        import torch
        from nanochat.decode import can_pack_weights
        from nanochat.engine import Engine
        from tests.test_engine import CHARS, CharTokenizer, _small_gpt
        assert not can_pack_weights("cpu", torch.bfloat16)
        tokenizer = CharTokenizer()
        engine = Engine(_small_gpt(len(CHARS)), tokenizer, dtype=torch.bfloat16)
        tokens = [column[0] for column, _ in engine.generate(tokenizer.encode("the cat"), max_tokens=8, temperature=0)]
        print(len(tokens))
    """)
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-1] == "8"


@pytest.mark.skipif(not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")),
                    reason="this torch has no oneDNN prepacked matmul")
def test_packed_fp32_matmul_is_the_plain_one_up_to_rounding():
    # whatever the rows the layout was made for (decode.onednn_packed), every row count gets F.linear's result
    generator = torch.Generator().manual_seed(0)
    w = torch.randn(300, 64, generator=generator)
    linear = PreparedLinear(w, torch.float32, pack="eager")
    for x in (torch.randn(1, 1, 64, generator=generator), torch.randn(8, 1, 64, generator=generator),
              torch.randn(1, 37, 64, generator=generator)):
        torch.testing.assert_close(linear(x), torch.nn.functional.linear(x, w), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(prepacked_linear(x, w), torch.nn.functional.linear(x, w), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_compiled_decode_matches_eager(model_and_tokenizer, capsys):
    model, tokenizer = model_and_tokenizer
    prompt = tokenizer.encode("abc")
    eager = _columns(Engine(model, tokenizer), prompt, num_samples=2, max_tokens=12, temperature=0.0)
    compiled = _columns(Engine(model, tokenizer, decode_mode="compile"), prompt, num_samples=2, max_tokens=12,
                        temperature=0.0)
    assert "decoding eagerly" not in capsys.readouterr().out  # it compiled, no fallback
    assert compiled == eager
    # a trained model (new weights) recompiles rather than reusing the frozen ones
    engine = Engine(model, tokenizer, decode_mode="compile")
    before = _columns(engine, prompt, max_tokens=8, temperature=0.0)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        with torch.no_grad():
            model.lm_head.weight.copy_(torch.randn_like(model.lm_head.weight))
        after = _columns(engine, prompt, max_tokens=8, temperature=0.0)
        assert after == [_naive_decode(model, prompt, 8)] and after != before
    finally:
        model.load_state_dict(saved)


@pytest.mark.slow
def test_compiled_cpu_decode_draws_what_eager_draws_with_one_step_for_every_top_k(model_and_tokenizer):
    # the compiled CPU step draws top-k in its own code, given the random numbers drawn outside it: the same tokens
    # as the eager sampler from the same seed, at any top_k (more than the vocabulary too) and temperature, all from
    # one compiled step; greedy takes another (the argmax in its code), the whole vocabulary a third (the plain step
    # and the eager sampler)
    model, tokenizer = model_and_tokenizer
    prompt = tokenizer.encode("a cat")
    compiled, eager = Engine(model, tokenizer, decode_mode="compile"), Engine(model, tokenizer)
    _columns(compiled, prompt, num_samples=3, max_tokens=4, temperature=0.6, top_k=50)  # compiles, as a chat's load
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for temperature, top_k in ((1.0, 5), (1.3, 2), (1.0, len(CHARS) + 10), (0.9, 20)):
        kwargs = dict(num_samples=3, max_tokens=16, temperature=temperature, top_k=top_k, seed=7)
        got = _columns(compiled, prompt, **kwargs)
        assert got == _columns(eager, prompt, **kwargs)
        assert len({token for row in got for token in row}) > 4  # draws, not one token repeated
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs  # nothing compiled again
    for kwargs in (dict(temperature=0.0), dict(temperature=1.0, top_k=None)):
        kwargs.update(num_samples=3, max_tokens=16, seed=7)
        assert _columns(compiled, prompt, **kwargs) == _columns(eager, prompt, **kwargs)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs + 2
    assert {step for step, _ in compiled.decoder.compiled_steps} == {
        decode.run_step_and_pick, decode.run_step_and_argmax, decode.run_step}


@pytest.mark.slow
def test_compiled_cpu_decode_compiles_once_for_every_position(model_and_tokenizer):
    # on CPU the position and the cache's capacity are symbolic: other prompt lengths (one past the first cache's
    # 256 positions too) and every step reuse one compiled step per batch size
    model, tokenizer = model_and_tokenizer
    engine = Engine(model, tokenizer, decode_mode="compile")
    prompts = [tokenizer.encode(text) for text in ("ab", "a longer prompt than that", "abc", "x" * 300)]
    assert len(prompts[-1]) + 10 > 256  # a larger cache than the first generation's
    _columns(engine, prompts[0], max_tokens=4, temperature=0.0)  # compiles
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for prompt in prompts:
        got = _columns(engine, prompt, max_tokens=10, temperature=0.0)
        assert got == [_naive_decode(model, prompt, 10)]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs  # nothing compiled again


@pytest.mark.slow
def test_compiled_cpu_step_is_called_without_dynamo_once_its_guards_pass(model_and_tokenizer, monkeypatch):
    # once compiled, each step calls the compiled version whose guards pass for its arguments directly, dynamo's own
    # call only when none does; the guards are checked at every call, so a cache it was not compiled for is refused
    model, tokenizer = model_and_tokenizer
    engine = Engine(model, tokenizer, decode_mode="compile")
    prompt = tokenizer.encode("a cat")
    sampling = dict(num_samples=2, max_tokens=12, temperature=0.9, top_k=5, seed=3)
    first = _columns(engine, prompt, **sampling)  # compiles
    through_dynamo = []
    compiled = decode.compiled_step

    def counted(step):
        through_dynamo.append(step)
        return compiled(step)

    monkeypatch.setattr(decode, "compiled_step", counted)
    longer = tokenizer.encode("a cat sat on the mat")
    assert _columns(engine, prompt, **sampling) == first
    assert _columns(engine, longer, **sampling) == _columns(Engine(model, tokenizer), longer, **sampling)
    assert through_dynamo == []
    call = engine.decoder.direct_calls[(decode.run_step_and_pick, 2)]
    with torch.inference_mode():  # as in a generation
        cache = KVCache(2, num_heads=2, seq_len=256, head_dim=16, num_layers=2, dtype=torch.float32)
        cache.pos = 40
        ids, noise, temperature = torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 5), torch.tensor(0.9)
        args = (engine.decoder.prepared, cache, ids, noise, temperature)
        assert call.serves(args)
        cache.pos = 256  # no room for the step's keys: the step would grow the cache, which the compiled one cannot
        assert not call.serves(args)
        cache.pos = 40
        bf16_cache = KVCache(2, num_heads=2, seq_len=256, head_dim=16, num_layers=2, dtype=torch.bfloat16)
        bf16_cache.pos = 40
        assert not call.serves((args[0], bf16_cache, *args[2:]))
    assert not call.serves(args)  # outside inference mode
    assert _columns(engine, prompt, **dict(sampling, num_samples=3)) == \
        _columns(Engine(model, tokenizer), prompt, **dict(sampling, num_samples=3))
    assert through_dynamo == [decode.run_step_and_pick]  # once: a new batch size's first step, which compiles


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_decode_with_live_weights_follows_training_without_compiling_again(model_and_tokenizer, dtype):
    # RL trains the model between generations: the compiled CPU step then reads the weights at each call (bf16:
    # through prepacked_linear), so that after an optimizer step it computes with the new ones, compiling nothing
    model, tokenizer = model_and_tokenizer
    engine = Engine(model, tokenizer, dtype=dtype, decode_mode="compile", live_weights=True)
    prompt = tokenizer.encode("abc")
    _columns(engine, prompt, num_samples=2, max_tokens=4, temperature=0.0)  # compiles
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        before = None
        for _ in range(2):
            with torch.no_grad():  # as an optimizer step changes them: in place, the stacked q too
                for weight in (model.lm_head.weight, model.transformer.h[0].attn.c_q.weight):
                    weight.add_(torch.randn_like(weight))
            got = _columns(engine, prompt, num_samples=2, max_tokens=10, temperature=0.0)
            assert got != before
            before = got
            if dtype == torch.float32:
                assert got == [_naive_decode(model, prompt, 10)] * 2
            else:  # each token the new weights' best guess up to bf16 rounding
                with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                    logits = model(torch.tensor([prompt + got[0]]))[0, len(prompt) - 1:-1].float()
                chosen = logits.gather(1, torch.tensor(got[0]).view(-1, 1))[:, 0]
                assert torch.all(chosen >= logits.max(dim=1).values - 0.25)
    finally:
        model.load_state_dict(saved)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs  # nothing compiled again


def test_engine_rejects_an_unknown_decode_mode(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    with pytest.raises(ValueError, match="decode mode must be one of"):
        Engine(model, tokenizer, decode_mode="graph")


@pytest.mark.parametrize("sampling", [dict(temperature=0.0), dict(temperature=0.8, top_k=3), dict(temperature=1.0)])
def test_compile_failure_falls_back_to_uncompiled(model_and_tokenizer, monkeypatch, capsys, sampling):
    # sampling: the failed step's random numbers were drawn before it ran, and the eager step picks with them
    import nanochat.decode as decode_module

    attempts = []

    def broken(*args):
        attempts.append(1)
        raise RuntimeError("no C++ compiler")

    model, tokenizer = model_and_tokenizer
    monkeypatch.setattr(decode_module, "compiled_step", lambda *step: broken)
    prompt = tokenizer.encode("abc")
    engine = Engine(model, tokenizer, decode_mode="compile")
    expected = _columns(Engine(model, tokenizer), prompt, num_samples=2, max_tokens=12, **sampling)
    assert _columns(engine, prompt, num_samples=2, max_tokens=12, **sampling) == expected
    assert capsys.readouterr().out.count("decoding eagerly") == 1
    # the next generation of the same weights does not try (and fail, and say so) again
    assert _columns(engine, prompt, num_samples=2, max_tokens=12, **sampling) == expected
    assert "decoding eagerly" not in capsys.readouterr().out and len(attempts) == 1


def test_bf16_decode_follows_the_model(model_and_tokenizer):
    # bf16 changes the arithmetic, so tokens can differ from fp32; each chosen token must still be the
    # model's (full forward, bf16 autocast) best guess up to bf16 rounding
    model, tokenizer = model_and_tokenizer
    prompt = tokenizer.encode("the cat")
    tokens = _columns(Engine(model, tokenizer, dtype=torch.bfloat16), prompt, max_tokens=20, temperature=0.0)[0]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(torch.tensor([prompt + tokens]))[0, len(prompt) - 1:-1].float()  # (20, V)
    chosen = logits.gather(1, torch.tensor(tokens).view(-1, 1))[:, 0]
    assert torch.all(chosen >= logits.max(dim=1).values - 0.25)
    if can_pack_weights("cpu", torch.bfloat16):  # the prepacked matmul is the plain bf16 one, bit for bit
        w = torch.randn(96, 64)
        for x in (torch.randn(3, 64).bfloat16(), torch.randn(3, 1, 64).bfloat16()):  # as given, and a decode step's
            expected = torch.nn.functional.linear(x, w.bfloat16())
            for pack in ("eager", "live"):
                assert torch.equal(PreparedLinear(w, torch.bfloat16, pack=pack)(x), expected)
            assert torch.equal(prepacked_linear(x, w.bfloat16()), expected)  # nothing attached: packed on the spot


def test_compiled_cpu_decode_is_bf16_wherever_the_cpu_has_bf16_units(monkeypatch):
    # Intel AMX measured its eager one-row bf16 matmuls no faster than fp32 ones, yet its compiled bf16 step was
    # 1.2-1.7x the fp32 one: eager follows the measurement, compiled follows the CPU's bf16 units
    monkeypatch.setattr(decode, "_measured_bf16_decode_speedup", lambda device: 1.0)
    for flags, compiled in (({"amx_bf16", "avx512_bf16"}, torch.bfloat16), ({"avx512f"}, torch.float32)):
        monkeypatch.setattr(hardware, "cpu_flags", lambda flags=flags: frozenset(flags))
        decode._bf16_decode_speedup.cache_clear()
        decode._cpu_bf16_is_native.cache_clear()
        try:
            assert decode.choose_decode_dtype("cpu") == torch.float32
            assert decode.choose_decode_dtype("cpu", "eager") == torch.float32
            assert decode.choose_decode_dtype("cpu", "compile") == compiled
        finally:  # later tests see the real machine again
            decode._bf16_decode_speedup.cache_clear()
            decode._cpu_bf16_is_native.cache_clear()


def test_cpu_decode_picks_its_threads_and_gives_them_back(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    engine = Engine(model, tokenizer)
    prompt = tokenizer.encode("the dog")
    torch.set_num_threads(2)  # the module fixture runs single-threaded; the choice needs more than one
    try:
        got = _columns(engine, prompt, max_tokens=12, temperature=0.0)
        assert torch.get_num_threads() == 2  # restored after every step
        assert got == [_naive_decode(model, prompt, 12)]
        trials = engine.decoder.thread_trials[1]
        assert set(trials) == {1, 2} and all(len(times) == 3 for times in trials.values())  # 6 trial steps, then fixed
    finally:
        torch.set_num_threads(1)


def test_cpu_decode_without_timed_threads_stays_on_torchs_count(model_and_tokenizer, monkeypatch):
    # what training that samples uses (RL rollouts): a timing must not pick the thread count, which changes the logits
    model, tokenizer = model_and_tokenizer
    engine = Engine(model, tokenizer, timed_threads=False)
    torch.set_num_threads(2)
    try:
        monkeypatch.setattr(torch, "set_num_threads", lambda n: pytest.fail("the decode step switched threads"))
        got = _columns(engine, tokenizer.encode("the dog"), max_tokens=12, temperature=0.0)
        assert got == [_naive_decode(model, tokenizer.encode("the dog"), 12)] and engine.decoder.thread_trials == {}
    finally:
        monkeypatch.undo()
        torch.set_num_threads(1)


def test_engine_sees_weights_change(model_and_tokenizer):
    # the Engine keeps decode weights between calls; training the model in between must not leave them stale
    model, tokenizer = model_and_tokenizer
    engine = Engine(model, tokenizer)
    prompt = tokenizer.encode("xy")
    before = _columns(engine, prompt, max_tokens=10, temperature=0.0)
    with torch.no_grad():
        model.lm_head.weight.mul_(-1.0)
    try:
        after = _columns(engine, prompt, max_tokens=10, temperature=0.0)
        assert after == [_naive_decode(model, prompt, 10)] and after != before
    finally:
        with torch.no_grad():
            model.lm_head.weight.mul_(-1.0)


# -----------------------------------------------------------------------------
# Tool use and row endings with a scripted model

class ScriptedModel(GPT):
    """
    Row b proposes scripts[b][p] as the token at position p + 1, whatever came before (the batch-1
    prefill uses scripts[0]). A GPT whose forward reads only the position, so the Engine runs it like any GPT.
    """

    def __init__(self, scripts, vocab_size):
        super().__init__(GPTConfig(sequence_len=64, vocab_size=vocab_size, n_layer=2, n_head=1, n_kv_head=1, n_embd=4))
        self.scripts = scripts

    def forward(self, idx, targets=None, kv_cache=None, loss_reduction="mean", last_only=False, capped=True):
        B, T = idx.shape
        T0 = 0 if kv_cache is None else kv_cache.get_pos()
        logits = torch.zeros(B, T, self.config.vocab_size)
        for b in range(B):
            for t in range(T):
                logits[b, t, self.scripts[b][T0 + t]] = 10.0
        if kv_cache is not None:
            kv_cache.pos += T
        return logits[:, -1:] if last_only else logits


def test_tool_use_forces_calculator_output_with_mask_zero():
    tok = CharTokenizer()
    ids = tok.encode_special
    expr = '"strawberry".count("r")*14'  # = 42
    call = [ids("<|python_start|>"), *tok.encode(expr), ids("<|python_end|>")]
    forced = [ids("<|output_start|>"), *tok.encode("42"), ids("<|output_end|>")]
    # while the output is forced, the model itself would write "z"s: the forced tokens must win.
    # Row 0 then ends with <|assistant_end|>, row 1 writes "ok" first and ends with <|bos|>.
    babble = tok.encode("z" * len(forced))
    scripts = [call + babble + [ids("<|assistant_end|>")] + tok.encode("zzzz"),
               call + babble + tok.encode("ok") + [ids("<|bos|>")]]
    engine = Engine(ScriptedModel(scripts, tok.get_vocab_size()), tok)
    prompt = [ids("<|bos|>")]

    stream = list(engine.generate(prompt, num_samples=2, max_tokens=60, temperature=0.0))
    assert len(stream) == len(scripts[1])  # stops as soon as every row has ended
    results, masks = engine.generate_batch(prompt, num_samples=2, max_tokens=60, temperature=0.0)
    assert results == [prompt + call + forced, prompt + call + forced + tok.encode("ok")]
    assert masks == [[0] + [1] * len(call) + [0] * len(forced),
                     [0] + [1] * len(call) + [0] * len(forced) + [1, 1]]


def test_tool_use_refused_expression_forces_nothing():
    tok = CharTokenizer()
    ids = tok.encode_special
    call = [ids("<|python_start|>"), *tok.encode("__import__('os')"), ids("<|python_end|>")]
    model = ScriptedModel([call + tok.encode("ok") + [ids("<|assistant_end|>")]], tok.get_vocab_size())
    results, masks = Engine(model, tok).generate_batch([ids("<|bos|>")], max_tokens=60, temperature=0.0)
    assert results[0] == [ids("<|bos|>")] + call + tok.encode("ok")
    assert masks[0] == [0] + [1] * (len(call) + 2)


# -----------------------------------------------------------------------------
# Calculator

@pytest.mark.parametrize("expr, expected", [
    ("1 + 2 * 3", "7"),
    ("(1 + 2) * 3", "9"),
    ("7 / 2", "3.5"),
    ("7 // 2", "3"),
    ("7 % 3", "1"),
    ("-2 ** 3", "-8"),
    ("+5 - -5", "10"),
    ("2 ** 10", "1024"),
    ("1,234 + 1", "1235"),
    ("0.1 + 0.2", str(0.1 + 0.2)),
    ('"strawberry".count("r")', "3"),
    ("'banana'.count('an') + 1", "3"),
])
def test_calculator_computes(expr, expected):
    assert use_calculator(expr) == expected


@pytest.mark.parametrize("expr", [
    "__import__('os')",
    "__import__('os').system('echo hi')",
    "().__class__",
    "'abc'.upper()",
    "(1).real",
    "x",
    "x + 1",
    "True",
    "print(1)",
    "'abc'[0]",
    "[i for i in (1, 2)]",
    "lambda: 1",
    "'a' * 10",
    "'%s' % 1",
    "'a'.count('a', 0)",
    "2 ** 100000",
    "9 ** 9 ** 9",
    "10.0 ** 400",
    "(-8) ** 0.5",
    "1 / 0",
    "1 +",
    "1" * 2000,
])
def test_calculator_refuses(expr):
    assert use_calculator(expr) is None
