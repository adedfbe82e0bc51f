"""
Inference: a KV cache and an Engine that streams tokens from a GPT.

The Engine works on token ids only (the tokenizer is needed just for the calculator tool):
1. prefill: run the prompt once with batch size 1, filling a KV cache;
2. copy that cache into a cache with one row per sample;
3. decode: feed one new token per row per step, attending over the cache.
Each step costs O(T) attention instead of the O(T^2) full forward a no-cache generator pays.

Tool use: when a row writes <|python_start|> expr <|python_end|>, the Engine evaluates expr with
the safe calculator (nanochat/calculator.py) and forces <|output_start|> result <|output_end|> into
that row. Forced tokens get mask 0, sampled tokens mask 1 (RL uses the mask to skip forced tokens).
"""

from collections import deque

import torch
import torch.nn.functional as F

from nanochat.calculator import use_calculator


class KVCache:
    """
    Keys and values of every layer, preallocated as one tensor (num_layers, 2, B, H, T, D).

    Protocol with the model's attention (nanochat/gpt.py): before a forward, the model reads
    get_pos() as the position offset T0 of the new tokens; each layer calls insert_kv(layer_idx, k, v)
    with k, v of shape (B, H, T_new, D) and gets back (B, H, T0 + T_new, D) views of everything so far.
    The position advances only after the last layer has inserted.
    """

    GROW_CHUNK = 1024  # grow in whole chunks so a long generation reallocates rarely

    def __init__(self, batch_size, num_heads, seq_len, head_dim, num_layers):
        self.batch_size = batch_size
        self.num_heads = num_heads
        self.seq_len = seq_len  # capacity in tokens; grows on demand
        self.head_dim = head_dim
        self.num_layers = num_layers
        self.kv = None  # allocated at the first insert, when the dtype and device are known
        self.pos = 0

    def get_pos(self):
        return self.pos

    def reset(self):
        # keep the memory, forget the contents
        self.pos = 0

    def _allocate(self, dtype, device):
        shape = (self.num_layers, 2, self.batch_size, self.num_heads, self.seq_len, self.head_dim)
        self.kv = torch.empty(shape, dtype=dtype, device=device)

    def _grow(self, needed_len):
        new_len = -(-(needed_len + self.GROW_CHUNK) // self.GROW_CHUNK) * self.GROW_CHUNK
        old = self.kv
        self.seq_len = new_len
        self._allocate(old.dtype, old.device)
        self.kv[:, :, :, :, : self.pos] = old[:, :, :, :, : self.pos]

    def insert_kv(self, layer_idx, k, v):
        if self.kv is None:
            self._allocate(k.dtype, k.device)
        B, H, T_new, D = k.shape
        if (B, H, D) != (self.batch_size, self.num_heads, self.head_dim):
            raise ValueError(
                f"insert_kv got k of shape {tuple(k.shape)} but the cache holds "
                f"(B={self.batch_size}, H={self.num_heads}, T, D={self.head_dim})"
            )
        t0, t1 = self.pos, self.pos + T_new
        if t1 > self.seq_len:
            self._grow(t1)
        self.kv[layer_idx, 0, :, :, t0:t1] = k
        self.kv[layer_idx, 1, :, :, t0:t1] = v
        if layer_idx == self.num_layers - 1:
            self.pos = t1
        return self.kv[layer_idx, 0, :, :, :t1], self.kv[layer_idx, 1, :, :, :t1]

    def prefill(self, other):
        """
        Copy the filled part of another cache into this one. other may have batch size 1 and is
        then broadcast to every row: one prompt prefill shared by num_samples samples.
        """
        if other.kv is None:
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
        self._allocate(other.kv.dtype, other.kv.device)
        self.kv[:, :, :, :, : other.pos] = other.kv[:, :, :, :, : other.pos]  # broadcasts over batch
        self.pos = other.pos


def sample_next_token(logits, generator, temperature=1.0, top_k=None):
    """logits (B, V) -> next token ids (B, 1). temperature 0 is greedy; top_k keeps the k largest logits."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0.0:
        return torch.argmax(logits, dim=-1, keepdim=True)
    if top_k is not None:
        values, indices = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1)  # (B, k)
        probs = F.softmax(values.float() / temperature, dim=-1)
        choice = torch.multinomial(probs, num_samples=1, generator=generator)
        return indices.gather(1, choice)
    probs = F.softmax(logits.float() / temperature, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


class _Row:
    """Per-sample state of the tool-use state machine."""

    def __init__(self):
        self.forced = deque()  # tokens waiting to be injected instead of sampled ones
        self.in_python = False
        self.expr_tokens = []
        self.done = False


class Engine:
    def __init__(self, model, tokenizer):
        self.model = model
        self.tokenizer = tokenizer

    def _cache(self, batch_size, seq_len):
        config = self.model.config
        return KVCache(
            batch_size=batch_size,
            num_heads=config.n_kv_head,
            seq_len=seq_len,
            head_dim=config.n_embd // config.n_head,
            num_layers=config.n_layer,
        )

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
        if max_tokens is None:
            max_tokens = max(0, self.model.config.sequence_len - len(tokens))
        device = self.model.get_device()
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)

        special = self.tokenizer.encode_special
        python_start, python_end = special("<|python_start|>"), special("<|python_end|>")
        output_start, output_end = special("<|output_start|>"), special("<|output_end|>")
        row_enders = {special("<|assistant_end|>"), self.tokenizer.get_bos_token_id()}

        # 1) prefill the prompt once, batch size 1
        prefill_cache = self._cache(1, len(tokens))
        ids = torch.tensor([tokens], dtype=torch.long, device=device)  # (1, T)
        logits = self.model(ids, kv_cache=prefill_cache)[:, -1, :]  # (1, V)
        # every row samples its own first token from the shared prompt logits
        logits = logits.expand(num_samples, -1)  # (num_samples, V)

        # 2) one cache row per sample, starting from the shared prompt
        cache = self._cache(num_samples, len(tokens) + max_tokens)
        cache.prefill(prefill_cache)
        del prefill_cache

        # 3) decode
        rows = [_Row() for _ in range(num_samples)]
        for step in range(max_tokens):
            if step > 0:
                logits = self.model(ids, kv_cache=cache)[:, -1, :]  # (num_samples, V)
            sampled = sample_next_token(logits, generator, temperature, top_k)[:, 0].tolist()

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
        row_enders = {self.tokenizer.encode_special("<|assistant_end|>"), self.tokenizer.get_bos_token_id()}
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
