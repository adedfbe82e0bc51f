"""
Engine, KV cache and calculator: equivalence with no-cache decoding, shared prefill, seeds, tool use.
python -m pytest tests/test_engine.py -q
"""

import math

import pytest
import torch

from nanochat.calculator import use_calculator
from nanochat.engine import Engine, KVCache, sample_next_token
from nanochat.gpt import GPTConfig, build_gpt


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
# KV cache

def _fill(cache, value, batch=None):
    """Insert one token whose keys are `value` and values are -`value` in every layer."""
    B = batch or cache.batch_size
    for layer in range(cache.num_layers):
        k = torch.full((B, cache.num_heads, 1, cache.head_dim), float(value))
        views = cache.insert_kv(layer, k, -k)
    return views


def test_kv_cache_insert_returns_full_views_and_advances_after_last_layer():
    cache = KVCache(batch_size=2, num_heads=3, seq_len=8, head_dim=4, num_layers=2)
    k = torch.randn(2, 3, 5, 4)
    v = torch.randn(2, 3, 5, 4)
    k_all, v_all = cache.insert_kv(0, k, v)
    assert cache.get_pos() == 0  # not until the last layer has inserted
    assert torch.equal(k_all, k) and torch.equal(v_all, v)
    cache.insert_kv(1, k, v)
    assert cache.get_pos() == 5
    k2 = torch.randn(2, 3, 1, 4)
    k_all, v_all = cache.insert_kv(0, k2, -k2)
    assert k_all.shape == (2, 3, 6, 4)
    assert torch.equal(k_all[:, :, :5], k) and torch.equal(k_all[:, :, 5:], k2) and torch.equal(v_all[:, :, 5:], -k2)
    cache.reset()
    assert cache.get_pos() == 0


def test_kv_cache_grows_and_keeps_contents():
    cache = KVCache(batch_size=2, num_heads=3, seq_len=4, head_dim=5, num_layers=3)
    for t in range(4):
        _fill(cache, t)
    capacity = cache.kv.size(4)
    k_all, v_all = _fill(cache, 4)  # one past the initial capacity
    assert cache.kv.size(4) > capacity
    assert cache.get_pos() == 5
    expected = torch.arange(5.0).view(1, 1, 5, 1).expand(2, 3, 5, 5)
    assert torch.equal(k_all, expected) and torch.equal(v_all, -expected)
    for layer in range(3):
        assert torch.equal(cache.kv[layer, 0, :, :, :5], expected)


def test_kv_cache_prefill_broadcasts_batch_one():
    small = KVCache(batch_size=1, num_heads=2, seq_len=3, head_dim=4, num_layers=2)
    prompt = []
    for _ in range(3):
        k = torch.randn(1, 2, 1, 4)
        prompt.append(k)
        for layer in range(2):
            small.insert_kv(layer, k, 2 * k)
    big = KVCache(batch_size=3, num_heads=2, seq_len=10, head_dim=4, num_layers=2)
    big.prefill(small)
    assert big.get_pos() == 3
    prompt = torch.cat(prompt, dim=2)  # (1, 2, 3, 4)
    for row in range(3):
        assert torch.equal(big.kv[1, 0, row, :, :3], prompt[0])
        assert torch.equal(big.kv[1, 1, row, :, :3], 2 * prompt[0])
    # rows diverge after the shared prefix
    new = torch.arange(3.0).view(3, 1, 1, 1).expand(3, 2, 1, 4)
    for layer in range(2):
        k_all, _ = big.insert_kv(layer, new, new)
    assert k_all.shape == (3, 2, 4, 4) and torch.equal(k_all[:, :, 3:], new)
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


def test_engine_sampling_matches_full_forward(model_and_tokenizer):
    # same seed, same sampler: the cached and uncached logits must agree at every step
    model, tokenizer = model_and_tokenizer
    prompt = tokenizer.encode("the cat")
    for top_k in (None, 10):
        expected = _naive_decode(model, prompt, 40, temperature=1.0, top_k=top_k, seed=3)
        got = _columns(Engine(model, tokenizer), prompt, max_tokens=40, temperature=1.0, top_k=top_k, seed=3)
        assert got == [expected]


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


# -----------------------------------------------------------------------------
# Tool use and row endings with a scripted model

class ScriptedModel(torch.nn.Module):
    """
    Row b proposes scripts[b][p] as the token at position p + 1, whatever came before (the batch-1
    prefill uses scripts[0]), and honours the KV-cache protocol like the real GPT does.
    """

    def __init__(self, scripts, vocab_size):
        super().__init__()
        self.config = type("Config", (), dict(n_layer=2, n_head=1, n_kv_head=1, n_embd=4, sequence_len=64))()
        self.scripts, self.vocab_size = scripts, vocab_size

    def get_device(self):
        return torch.device("cpu")

    def forward(self, idx, kv_cache=None):
        B, T = idx.shape
        T0 = 0 if kv_cache is None else kv_cache.get_pos()
        if kv_cache is not None:
            for layer in range(self.config.n_layer):
                kv_cache.insert_kv(layer, torch.zeros(B, 1, T, 4), torch.zeros(B, 1, T, 4))
        logits = torch.zeros(B, T, self.vocab_size)
        for b in range(B):
            for t in range(T):
                logits[b, t, self.scripts[b][T0 + t]] = 10.0
        return logits


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
