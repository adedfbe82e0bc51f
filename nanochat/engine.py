"""
Inference: a KV cache and an Engine that streams tokens from a GPT.

The Engine works on token ids only (the tokenizer is needed just for the calculator tool):
1. prefill: run the prompt once with batch size 1 (GPT.forward), filling a KV cache;
2. copy that cache into a cache with one row per sample;
3. decode: feed one new token per row per step, attending over the cache: the model's forward for one
   token, run fast by nanochat/decode.py (a copy with prepared weights; eager, compiled or a CUDA graph),
   and the next token drawn from its logits (nanochat/sampling.py).
Each step costs O(T) attention instead of the O(T^2) full forward a no-cache generator pays.

Tool use: when a row writes <|python_start|> expr <|python_end|>, the Engine evaluates expr with
the safe calculator (nanochat/calculator.py) and forces <|output_start|> result <|output_end|> into
that row. Forced tokens get mask 0, sampled tokens mask 1 (RL uses the mask to skip forced tokens).
"""

from collections import deque

import torch

from nanochat.calculator import use_calculator
from nanochat.decode import Decoder
from nanochat.gpt import soft_cap
from nanochat.sampling import Sampler


class KVCache:
    """
    Storage for the keys and values of every layer, one (B, H_kv, capacity, D) tensor each, allocated once and
    written in place by the model's attention (gpt.CausalSelfAttention.attend_with_cache), and the number of
    positions written, pos, which the model advances after each forward. One tensor per layer, not one for
    all: a compiled step then writes each in place instead of copying the whole cache.

    pos is an int, or (hold_position_on_device) a 0-d tensor on the cache's device, for fixed-shape decode
    steps (a compiled static step, a captured CUDA graph): then nothing on the host depends on it.
    """

    GROW_CHUNK = 1024  # an int position past the capacity grows it in whole chunks, so a long prefill reallocates rarely

    def __init__(self, batch_size, num_heads, seq_len, head_dim, num_layers, dtype=None, device=None):
        self.batch_size = batch_size
        self.num_heads = num_heads
        self.seq_len = seq_len  # capacity in tokens
        self.head_dim = head_dim
        self.num_layers = num_layers
        self.k = self.v = None  # per layer (B, H_kv, capacity, D)
        self.pos = 0  # positions written so far
        if dtype is not None:  # else allocated at the first insert, in the dtype and on the device of k
            self._allocate(dtype, device)

    def get_pos(self):
        return self.pos

    @property
    def dtype(self):
        return self.k[0].dtype

    def reset(self):
        # keep the memory, forget the contents (positions >= pos are never attended)
        self.pos = 0

    def _allocate(self, dtype, device, keep=0):
        old_k, old_v = self.k, self.v
        shape = (self.batch_size, self.num_heads, self.seq_len, self.head_dim)
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(self.num_layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(self.num_layers)]
        for layer in range(self.num_layers if keep else 0):
            self.k[layer][:, :, :keep] = old_k[layer][:, :, :keep]  # broadcasts a batch-1 source over the rows
            self.v[layer][:, :, :keep] = old_v[layer][:, :, :keep]

    def insert(self, layer_idx, k, v):
        """Write k, v (B, H_kv, T, D) at the position; the keys and values so far (up to pos + T, or the whole
        capacity when the position is a tensor), in the cache's dtype."""
        B, H, T, D = k.shape
        if (B, H, D) != (self.batch_size, self.num_heads, self.head_dim):
            raise ValueError(f"insert got k of shape {tuple(k.shape)} but the cache holds "
                             f"(B={self.batch_size}, H={self.num_heads}, T, D={self.head_dim})")
        if self.k is None:
            self._allocate(k.dtype, k.device)
        keys, values = self.k[layer_idx], self.v[layer_idx]
        if isinstance(self.pos, torch.Tensor):
            keys.index_copy_(2, self.pos.view(1), k.to(keys.dtype))
            values.index_copy_(2, self.pos.view(1), v.to(values.dtype))
            return keys, values
        t0, t1 = self.pos, self.pos + T
        if t1 > keys.size(2):  # the capacity (seq_len), as the tensors hold it: symbolic in a compiled CPU step
            self.seq_len = -(-(t1 + self.GROW_CHUNK) // self.GROW_CHUNK) * self.GROW_CHUNK
            self._allocate(keys.dtype, keys.device, keep=t0)
            keys, values = self.k[layer_idx], self.v[layer_idx]
        keys[:, :, t0:t1] = k
        values[:, :, t0:t1] = v
        return keys[:, :, :t1], values[:, :, :t1]

    def hold_position_on_device(self):
        """Keep the position in a tensor on the cache's device from now on (see the class docstring)."""
        # Unwritten positions get an attention weight of exactly 0, but 0 times uninitialised memory can be NaN
        for layer in range(self.num_layers):
            self.k[layer][:, :, self.pos:].zero_()
            self.v[layer][:, :, self.pos:].zero_()
        device = self.k[0].device
        self.positions = torch.arange(self.seq_len, device=device)  # what the model masks by
        self.pos = torch.tensor(self.pos, device=device)

    def prefill(self, other, dtype=None):
        """
        Copy the filled part of another cache into this one, in dtype (None: other's). other may have batch
        size 1 and is then broadcast to every row: one prompt prefill shared by num_samples samples.
        """
        if other.k is None:
            raise ValueError("prefill source cache is empty: run a forward pass with it first")
        same = (other.num_layers, other.num_heads, other.head_dim) == (self.num_layers, self.num_heads, self.head_dim)
        if not same:
            raise ValueError(
                f"prefill between incompatible caches: layers/heads/head_dim "
                f"{(other.num_layers, other.num_heads, other.head_dim)} vs "
                f"{(self.num_layers, self.num_heads, self.head_dim)}"
            )
        if other.batch_size not in (1, self.batch_size):
            raise ValueError(f"prefill source batch size must be 1 or {self.batch_size}, got {other.batch_size}")
        self.seq_len = max(self.seq_len, other.pos)
        self.k, self.v, self.pos = other.k, other.v, other.pos
        self._allocate(dtype or other.k[0].dtype, other.k[0].device, keep=other.pos)


class _Row:
    """Per-sample state of the tool-use state machine."""

    def __init__(self):
        self.forced = deque()  # tokens waiting to be injected instead of sampled ones
        self.in_python = False
        self.expr_tokens = []
        self.done = False


def answer_enders(tokenizer):
    """Tokens that end an answer: the model closing its turn, or starting a new document."""
    return {tokenizer.encode_special("<|assistant_end|>"), tokenizer.get_bos_token_id()}


class Engine:
    """
    Streams tokens from a model: one batched prefill of the prompt, then one cheap step per token
    (nanochat/decode.py). generate yields a column of tokens per step, generate_batch runs to the end.

    dtype: what decoding computes in. None follows the caller: the autocast dtype if generate is called
    under torch.autocast, else the model's own (fp32). The prefill computes in it too, on the decode steps' copy of
    the model with its weights in that dtype (decode.Decoder.prompt_model).
    decode_mode: "eager", "compile" or "cuda_graph" (decode.MODES); None = cuda_graph on CUDA, eager elsewhere.
    On CPU "compile" decodes several times faster than eager at small batch sizes once compiled, and
    compiling takes seconds (dev/bench_engine.py), so it pays for long sessions (chat, evaluation), not
    for a few samples. timed_threads=False: the same numbers in every run. live_weights=True: the model is trained
    between generations (RL), and a compiled step follows its weights without compiling again (see decode.Decoder).
    """

    def __init__(self, model, tokenizer, dtype=None, decode_mode=None, timed_threads=True, live_weights=False):
        self.model = model
        self.tokenizer = tokenizer
        self.dtype = dtype
        self.decoder = Decoder(decode_mode, timed_threads, live_weights)

    @torch.inference_mode()
    def generate(self, tokens, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, seed=42):
        """
        Stream (token_column, token_masks) per step: one token and one mask per sample.
        Stops after max_tokens steps or once every row has ended (<|assistant_end|> or <|bos|>);
        max_tokens=None means until every row ends or the sequence fills the model's context
        (config.sequence_len). A row that has ended keeps receiving (meaningless) tokens until the
        others end; generate_batch cuts them off.
        """
        if not (isinstance(tokens, list) and tokens and all(isinstance(t, int) for t in tokens)):
            raise ValueError("tokens must be a non-empty list of ints (the prompt token ids)")
        config = self.model.config
        if max_tokens is None:
            max_tokens = max(0, config.sequence_len - len(tokens))
        device = self.model.get_device()
        sampler = Sampler(torch.Generator(device=device).manual_seed(seed), temperature, top_k, cap=soft_cap)
        dtype = self.dtype
        if dtype is None:
            dtype = (torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type)
                     else self.model.lm_head.weight.dtype)

        special = self.tokenizer.encode_special
        python_start, python_end = special("<|python_start|>"), special("<|python_end|>")
        output_start, output_end = special("<|output_start|>"), special("<|output_end|>")
        row_enders = answer_enders(self.tokenizer)

        # 1) prefill the prompt once, batch size 1, in one forward, into a cache sized for the whole
        # generation (rounded up, so compiled steps serve prompts of similar lengths); it never grows.
        capacity = -(-(len(tokens) + max_tokens) // 256) * 256
        kv_shape = dict(num_heads=config.n_kv_head, head_dim=config.n_embd // config.n_head, num_layers=config.n_layer)
        # On CPU the prefill's cache and attention stay fp32 whatever the decode dtype: SDPA is slower there in bf16
        # (dev/bench_engine.py --dtypes), and so are eager decode steps. Compiled steps attend in generated code that
        # streams the cache once per step, so it is half the bytes in bf16: ~1.1x a batch-8 step. Elsewhere the
        # cache is in the decode dtype.
        cache_dtype = torch.float32 if device.type == "cpu" else dtype
        compiled_on_cpu = device.type == "cpu" and self.decoder.mode == "compile" and not self.decoder.failed
        decode_cache_dtype = dtype if compiled_on_cpu else cache_dtype
        prefill_cache = KVCache(1, seq_len=capacity, dtype=cache_dtype, device=device, **kv_shape)
        ids = torch.tensor([tokens], dtype=torch.long, device=device)  # (1, T)
        prompt_model = self.decoder.prompt_model(self.model, device, dtype)  # computes in dtype, as the decode steps
        logits = prompt_model(ids, kv_cache=prefill_cache, last_only=True, capped=False)[:, -1, :]  # (1, V)
        # every row samples its own first token from the shared prompt logits
        logits = logits.expand(num_samples, -1)  # (num_samples, V)

        # 2) one cache row per sample, starting from the shared prompt
        if num_samples == 1 and decode_cache_dtype == cache_dtype:
            cache = prefill_cache
        else:
            cache = KVCache(num_samples, seq_len=capacity, **kv_shape)
            cache.prefill(prefill_cache, dtype=decode_cache_dtype)
        del prefill_cache

        # 3) decode
        rows = [_Row() for _ in range(num_samples)]
        step = None  # made after the first token is out, so it does not delay it
        for i in range(max_tokens):
            if i == 0:
                next_ids = sampler(logits)
            else:
                step = step or self.decoder.start(self.model, cache, dtype, sampler)
                next_ids = step(ids)  # (num_samples, 1)
            sampled = next_ids[:, 0].tolist()

            token_column, token_masks = [], []
            for row, sampled_token in zip(rows, sampled):
                forced = len(row.forced) > 0
                token = row.forced.popleft() if forced else sampled_token
                token_column.append(token)
                token_masks.append(0 if forced else 1)
                if token in row_enders:
                    row.done = True
                # tool use: collect the expression, evaluate it at <|python_end|>
                if token == python_start:
                    row.in_python, row.expr_tokens = True, []
                elif token == python_end and row.in_python:
                    row.in_python = False
                    result = use_calculator(self.tokenizer.decode(row.expr_tokens)) if row.expr_tokens else None
                    if result is not None:
                        row.forced.extend([output_start, *self.tokenizer.encode(result), output_end])
                    row.expr_tokens = []
                elif row.in_python:
                    row.expr_tokens.append(token)

            yield token_column, token_masks
            if all(row.done for row in rows):
                break
            ids = torch.tensor(token_column, dtype=torch.long, device=device).unsqueeze(1)  # (num_samples, 1)

    def generate_batch(self, tokens, num_samples=1, **kwargs):
        """
        Run generate to the end. Returns (results, masks): per sample, the prompt followed by the
        generated tokens up to (not including) <|assistant_end|> or <|bos|>; masks are 0 for the
        prompt and forced tool-output tokens, 1 for sampled tokens.
        """
        row_enders = answer_enders(self.tokenizer)
        results = [list(tokens) for _ in range(num_samples)]
        masks = [[0] * len(tokens) for _ in range(num_samples)]
        done = [False] * num_samples
        for token_column, token_masks in self.generate(tokens, num_samples, **kwargs):
            for i, (token, mask) in enumerate(zip(token_column, token_masks)):
                if done[i]:
                    continue
                if token in row_enders:
                    done[i] = True
                else:
                    results[i].append(token)
                    masks[i].append(mask)
            if all(done):
                break
        return results, masks


# -----------------------------------------------------------------------------
# Fixed prompts whose greedy continuations show training progress (base_train and base_loss print them)
SAMPLE_PROMPTS = [
    "The capital of France is",
    "The chemical symbol of gold is",
    "If yesterday was Friday, then tomorrow will be",
    "The opposite of hot is",
    "The planets of the solar system are:",
    "My favorite color is",
    "If 5*x + 3 = 13, then x is",
]


def greedy_sample(model, tokenizer, prompt, max_tokens, autocast_ctx):
    """Prompt plus its greedy continuation (the Engine decodes with a KV cache)."""
    with autocast_ctx:
        sequences, _ = Engine(model, tokenizer).generate_batch(tokenizer(prompt, prepend="<|bos|>"), num_samples=1,
                                                              max_tokens=max_tokens, temperature=0)
    return tokenizer.decode(sequences[0])
