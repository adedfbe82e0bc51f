"""
Inference: a KV cache and an Engine that streams tokens from a GPT.

The Engine works on token ids only (the tokenizer is needed just for the calculator tool):
1. prefill: run the prompt once with batch size 1 (GPT.forward), filling a KV cache;
2. copy that cache into a cache with one row per sample;
3. decode: feed one new token per row per step, attending over the cache. The step is decode_forward,
   GPT.forward rewritten for one token (fewer, larger ops) on DecodeWeights (weights cast once, and
   on CPU prepacked for oneDNN); DecodeStep runs it eagerly, compiled, or as a replayed CUDA graph.
Each step costs O(T) attention instead of the O(T^2) full forward a no-cache generator pays, and no
host-side work that grows with T.

Tool use: when a row writes <|python_start|> expr <|python_end|>, the Engine evaluates expr with
the safe calculator (nanochat/calculator.py) and forces <|output_start|> result <|output_end|> into
that row. Forced tokens get mask 0, sampled tokens mask 1 (RL uses the mask to skip forced tokens).
"""

import time
from collections import deque

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat import hardware
from nanochat.calculator import use_calculator
from nanochat.common import print0


class KVCache:
    """
    Keys and values of every layer, one (B, H, capacity, D) tensor each per layer, allocated once and
    written in place (one tensor per layer, not one for all: a compiled step then writes each in place
    instead of copying the whole cache).

    Protocol with the model (nanochat/gpt.py): forward asks rotary(cos, sin, T) for the angles of its
    T new tokens, then each layer calls attend(layer_idx, q, k, v), which stores k, v (B, H, T, D) and
    returns the attention of q over everything cached so far. The position advances after the last layer.

    Two ways of addressing the cache:
    - by slices (prefill, and any forward outside a decode step): the host-side position self.pos picks
      the slice to write and the prefix to attend over, so shapes change with the position;
    - by a position tensor (static=True, the Engine's decode step, one token per row): the position is
      read on the device from pos_tensor and attention runs over the whole capacity with the positions
      not yet written masked out. Every shape is then fixed, so one compiled step (or one captured CUDA
      graph) serves every token, and nothing on the host depends on the sequence length.
    """

    GROW_CHUNK = 1024  # growing (slices only) goes in whole chunks so that a long prefill reallocates rarely

    def __init__(self, batch_size, num_heads, seq_len, head_dim, num_layers, dtype=None, device=None):
        self.batch_size = batch_size
        self.num_heads = num_heads
        self.seq_len = seq_len  # capacity in tokens
        self.head_dim = head_dim
        self.num_layers = num_layers
        self.k = self.v = None  # per layer (B, H, capacity, D)
        self.pos = 0  # tokens stored so far
        self.pos_tensor = None  # the same count on the device, for the static decode step (see sync_pos_tensor)
        self.static = False
        if dtype is not None:  # else allocated at the first attend, in the dtype and on the device of k
            self._allocate(dtype, device)

    def get_pos(self):
        return self.pos

    @property
    def dtype(self):
        return self.k[0].dtype

    def reset(self):
        # keep the memory, forget the contents (stale entries stay invisible: positions >= pos are never attended)
        self.pos = 0

    def sync_pos_tensor(self):
        """Copy the host-side position to the device before static steps (they then advance both)."""
        self.pos_tensor.fill_(self.pos)

    def make_static(self):
        """Switch to addressing by the position tensor (see the class docstring), for the rest of the generation."""
        # Unwritten positions get an attention weight of exactly 0, but 0 times uninitialised memory can be NaN
        for layer in range(self.num_layers):
            self.k[layer][:, :, self.pos:].zero_()
            self.v[layer][:, :, self.pos:].zero_()
        self.static = True
        self.sync_pos_tensor()

    def _allocate(self, dtype, device, keep=0):
        old_k, old_v = self.k, self.v
        shape = (self.batch_size, self.num_heads, self.seq_len, self.head_dim)
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(self.num_layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(self.num_layers)]
        for layer in range(self.num_layers if keep else 0):
            self.k[layer][:, :, :keep] = old_k[layer][:, :, :keep]  # broadcasts a batch-1 source over the rows
            self.v[layer][:, :, :keep] = old_v[layer][:, :, :keep]
        self.positions = torch.arange(self.seq_len, device=device)
        self.pos_tensor = torch.tensor(self.pos, device=device)

    def prefill(self, other):
        """
        Copy the filled part of another cache into this one. other may have batch size 1 and is
        then broadcast to every row: one prompt prefill shared by num_samples samples.
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
        self._allocate(other.k[0].dtype, other.k[0].device, keep=other.pos)

    def rotary(self, cos, sin, T):
        """The rotary angles (1, T, 1, D/2) of the next T positions, from the model's tables."""
        if self.static:
            if T != 1:
                raise ValueError(f"the decode step takes one token per row, got {T}")
            at = self.pos_tensor.view(1)
            self.visible = (self.positions <= self.pos_tensor).view(1, -1)  # (1, capacity): what this token may see
            return cos.index_select(1, at), sin.index_select(1, at)
        if self.pos + T > cos.size(1):
            raise ValueError(f"positions up to {self.pos + T} exceed the rotary table ({cos.size(1)} = 10 x "
                             "sequence_len); use a larger sequence_len in GPTConfig")
        return cos[:, self.pos:self.pos + T], sin[:, self.pos:self.pos + T]

    def attend(self, layer_idx, q, k, v):
        """Store k, v (B, H_kv, T, D) after the cached ones; attention output (B, H, T, D) of q over all of them."""
        B, H, T, D = k.shape
        if (B, H, D) != (self.batch_size, self.num_heads, self.head_dim):
            raise ValueError(
                f"attend got k of shape {tuple(k.shape)} but the cache holds "
                f"(B={self.batch_size}, H={self.num_heads}, T, D={self.head_dim})"
            )
        if self.k is None:
            self._allocate(k.dtype, k.device)
        dtype = self.dtype
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)  # e.g. fp32 k from a norm under autocast: the cache decides
        gqa = q.size(1) != H
        last_layer = layer_idx == self.num_layers - 1
        if self.static:
            at = self.pos_tensor.view(1)
            self.k[layer_idx].index_copy_(2, at, k)
            self.v[layer_idx].index_copy_(2, at, v)
            y = F.scaled_dot_product_attention(q, self.k[layer_idx], self.v[layer_idx], attn_mask=self.visible,
                                               enable_gqa=gqa)
            if last_layer:
                self.pos_tensor += 1  # the host-side self.pos is advanced by whoever runs the step
            return y

        t0, t1 = self.pos, self.pos + T
        if t1 > self.seq_len:
            self.seq_len = -(-(t1 + self.GROW_CHUNK) // self.GROW_CHUNK) * self.GROW_CHUNK
            self._allocate(k.dtype, k.device, keep=t0)
        self.k[layer_idx][:, :, t0:t1] = k
        self.v[layer_idx][:, :, t0:t1] = v
        keys, values = self.k[layer_idx][:, :, :t1], self.v[layer_idx][:, :, :t1]  # (B, H, t1, D)
        if t0 == 0:  # nothing cached before: plain causal attention
            y = F.scaled_dot_product_attention(q, keys, values, is_causal=True, enable_gqa=gqa)
        elif T == 1:  # one new token sees everything
            y = F.scaled_dot_product_attention(q, keys, values, enable_gqa=gqa)
        else:  # a chunk: all of the cached prefix, then causal within the chunk
            visible = torch.ones(T, t1, dtype=torch.bool, device=q.device).tril(diagonal=t0)
            y = F.scaled_dot_product_attention(q, keys, values, attn_mask=visible, enable_gqa=gqa)
        if last_layer:
            self.pos = t1
        return y


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


def can_pack_weights(device, dtype):
    """oneDNN's prepacked matmul: on CPU, in bf16 (plain bf16 matmuls of one row are slow there, see hardware.py)."""
    return (torch.device(device).type == "cpu" and dtype == torch.bfloat16 and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


def prepare_weight(weight, dtype, pack):
    """weight (out, in) cast to dtype, and with pack=True reordered once into oneDNN's blocked layout."""
    weight = weight.detach().to(dtype)
    return torch.ops.mkldnn._reorder_linear_weight(weight, 1) if pack else weight


def linear(x, weight, dtype, pack):
    """x @ weight.T in dtype, for a weight from prepare_weight (prepacked: the same result as F.linear in bf16)."""
    if pack:
        return torch.ops.mkldnn._linear_pointwise(x.to(dtype), weight, None, "none", [None], "")
    return F.linear(x.to(dtype), weight)


class LayerWeights(nn.Module):
    """One block's four matrices, prepared by DecodeWeights (buffers, so that a compiled step can freeze them)."""

    def __init__(self, qkv, proj, fc, mlp_proj):
        super().__init__()
        for name, weight in (("qkv", qkv), ("proj", proj), ("fc", fc), ("mlp_proj", mlp_proj)):
            self.register_buffer(name, weight, persistent=False)


class DecodeWeights(nn.Module):
    """
    The model's weights laid out for decoding one token per row: cast to the decode dtype once,
    q/k/v of each layer stacked into one matrix (one matmul instead of three), rotary tables doubled
    so q and k rotate with one multiply-add each. With pack=True (CPU, bf16, eager) every matrix is also
    reordered once into oneDNN's blocked layout and matmuls go straight to oneDNN (the results are
    identical to F.linear on the same bf16 weights). A module of buffers: the compiled CPU step
    (DecodeStep) freezes them into its code as constants.

    The weights are copied, so they go stale when the model trains: Engine rebuilds them when the
    model's parameters have changed (their version counters moved).
    """

    def __init__(self, model, dtype, pack):
        super().__init__()
        config = model.config
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        self.dtype, self.pack = dtype, pack
        self.thread_trials = {}  # CPU, per batch size: {threads: [seconds per decode step]} (see DecodeStep)
        self.compiled_batch_sizes = set()  # CPU: the batch sizes a compiled step exists for (see DecodeStep)
        self.compile_failed = False  # compiling (or capturing) failed once: later steps run uncompiled at once

        def prepare(weight):
            return prepare_weight(weight, dtype, pack)

        # the embedding is looked up, not multiplied: used as it is
        self.register_buffer("wte", model.transformer.wte.weight.detach(), persistent=False)
        self.layers = nn.ModuleList()
        for block in model.transformer.h:
            attn, mlp = block.attn, block.mlp
            qkv = torch.cat([attn.c_q.weight, attn.c_k.weight, attn.c_v.weight])  # ((H + 2 H_kv) D, C)
            self.layers.append(LayerWeights(*(prepare(w) for w in (qkv, attn.c_proj.weight, mlp.c_fc.weight,
                                                                   mlp.c_proj.weight))))
        self.register_buffer("lm_head", prepare(model.lm_head.weight), persistent=False)
        # x1 cos + x2 sin, x2 cos - x1 sin (gpt.apply_rotary_emb) = x * [cos, cos] + roll(x, D/2) * [sin, -sin]
        cos, sin = model.cos.to(dtype), model.sin.to(dtype)  # (1, T, 1, D/2)
        self.register_buffer("cos", torch.cat([cos, cos], dim=-1), persistent=False)
        self.register_buffer("sin", torch.cat([sin, -sin], dim=-1), persistent=False)

    def linear(self, x, weight):
        return linear(x, weight, self.dtype, self.pack)

    def matrix_bytes(self):
        """Bytes of the matrices one decode step reads (the embedding is only looked up)."""
        matrices = [self.lm_head, *(w for layer in self.layers for w in layer.buffers())]
        return sum(w.numel() * w.element_size() for w in matrices)


def decode_forward(w, cache, ids):
    """
    GPT.forward for one new token per row, ids (B, 1) -> logits (B, V), written with as few ops as
    possible: per layer 3 matmuls + 1 for q/k/v, and about a dozen small ops around them. In fp32 it is
    the same arithmetic in the same order (tests check the tokens against the model's own forward); in
    bf16 the matmuls are bf16 and everything from q/k/v on is in the cache's dtype (fp32 on CPU).
    """
    B = ids.size(0)
    H, H_kv, D = w.n_head, w.n_kv_head, w.head_dim
    x = F.embedding(ids[:, 0], w.wte)  # (B, C)
    C = x.size(1)
    x = F.rms_norm(x.to(torch.promote_types(x.dtype, w.dtype)), (C,))  # bf16 embedding, fp32 decode: as GPT.forward
    cos, sin = cache.rotary(w.cos, w.sin, 1)  # (1, 1, 1, D)
    for layer_idx, layer in enumerate(w.layers):
        qkv = w.linear(F.rms_norm(x, (C,)), layer.qkv).to(cache.dtype).view(B, 1, H + 2 * H_kv, D)
        qk = qkv[:, :, : H + H_kv]  # q and k rotate and normalise together
        qk = qk * cos + qk.roll(D // 2, dims=-1) * sin
        qk = F.rms_norm(qk, (D,))
        q, k, v = qk[:, :, :H], qk[:, :, H:], qkv[:, :, H + H_kv:]
        y = cache.attend(layer_idx, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # (B, H, 1, D)
        x = x + w.linear(y.reshape(B, C), layer.proj)
        x = x + w.linear(F.relu(w.linear(F.rms_norm(x, (C,)), layer.fc)).square(), layer.mlp_proj)
    logits = w.linear(F.rms_norm(x, (C,)), w.lm_head).float()  # (B, V)
    softcap = 15.0
    return softcap * torch.tanh(logits / softcap)


_compiled_decode_forward = None  # torch.compile(decode_forward), made on first use (one per process)


def compiled_decode_forward():
    global _compiled_decode_forward
    if _compiled_decode_forward is None:
        _compiled_decode_forward = torch.compile(decode_forward, fullgraph=True)
    return _compiled_decode_forward


# How the step is compiled on CPU (settings in force while its first call compiles it):
# - freezing: DecodeWeights' buffers become constants of the code, prepacked for its matmuls;
# - the cache position (KVCache.pos, read by decode_forward as cache.pos) symbolic from the start, so
#   one compiled step serves every position, attending over the filled part of the cache only;
# - when the weights fit in half the largest CPU cache: max_autotune with inductor's C++ GEMM templates as
#   candidates. The matmuls of a few rows then become generated code instead of oneDNN calls, whose fixed cost
#   (12-20 us each, 17 per step at depth 4) was half of a batch-1 step. Autotuning times each candidate on
#   this machine, but with the weights hot in cache; when they are not, the templates lose. Measured on a
#   2-core EPYC (32 MB L3), ms per bf16 step at batch 1, templates vs oneDNN: depth 4 (10 MB of weights)
#   0.28 vs 0.45; depth 6 (27 MB) 1.22 vs 0.97; depth 8 (58 MB) 3.60 vs 2.05.
CPU_COMPILE_DYNAMIC = "L['cache'].pos"


def cpu_compile_settings(weights):
    """Inductor settings for compiling the decode step on CPU with these weights (see above)."""
    settings = dict(freezing=True)
    if 2 * weights.matrix_bytes() <= hardware.cpu_cache_bytes():
        settings.update(max_autotune=True, max_autotune_gemm_backends="CPP,ATEN",
                        autotune_num_choices_displayed=0, max_autotune_report_choices_stats=False)  # no tables
    return settings


DECODE_MODES = ("eager", "compile", "cuda_graph")


class DecodeStep:
    """
    Runs decode_forward on one cache, token after token, as:
    - "eager": plain PyTorch ops, the cache addressed by slices (fewest ops when nothing is compiled);
    - "compile": torch.compile of it. On CPU with the weights frozen in and a symbolic position
      (cpu_compile_settings); elsewhere of the static form (cache addressed by a position tensor, fixed
      shapes). Recompiles for new weights or a new batch size (static form: a new capacity too);
      a DecodeStep of the same weights and batch size reuses the compiled code;
    - "cuda_graph": the static form captured once as a CUDA graph and replayed: one launch per token.
    If compiling or capturing fails (no C++ compiler, an unsupported op...), it says so once and runs
    the same form uncompiled.
    """

    def __init__(self, weights, cache, mode):
        if mode not in DECODE_MODES:
            raise ValueError(f"decode mode must be one of {DECODE_MODES}, got {mode!r}")
        device_type = cache.pos_tensor.device.type
        if mode == "cuda_graph" and device_type != "cuda":
            raise ValueError(f"cuda_graph decoding needs the model on a CUDA device, not {cache.pos_tensor.device}")
        if mode != "eager" and weights.pack:
            raise ValueError("prepacked (oneDNN) weights are for eager decoding; build DecodeWeights with pack=False")
        self.weights, self.cache, self.mode = weights, cache, mode
        self.forward = compiled_decode_forward() if mode == "compile" else decode_forward
        self.first_call = True
        self.static = mode == "cuda_graph" or (mode == "compile" and device_type != "cpu")
        if self.static:
            cache.make_static()

    def __call__(self, ids):
        """ids (B, 1) on the model's device -> fp32 logits (B, V) for the next position."""
        cache = self.cache
        if self.mode == "eager" and cache.pos_tensor.device.type == "cpu" and torch.get_num_threads() > 1:
            return self._on_cpu_threads(ids)
        if self.mode == "eager":
            return decode_forward(self.weights, cache, ids)  # attend advanced cache.pos
        if self.first_call:
            self.first_call = False
            logits = self._first_call(ids)
        elif self.mode == "cuda_graph":
            self.static_ids.copy_(ids)
            self.graph.replay()
            logits = self.static_logits  # overwritten by the next replay: sample from it first
        else:  # compiled, or the uncompiled fallback
            logits = self.forward(self.weights, cache, ids)
        if self.static:
            cache.pos += 1  # the static form advanced cache.pos_tensor on the device
        return logits

    def _on_cpu_threads(self, ids):
        """
        The eager step on CPU with one thread or torch's number, whichever was faster: for matmuls of a few
        rows one thread can win (no waking the others for each op), measured 2x on a 2-core EPYC at batch 1.
        The first 6 steps of a batch size alternate between the two; the choice is kept with the weights.
        """
        threads = torch.get_num_threads()
        trials = self.weights.thread_trials.setdefault(ids.size(0), {1: [], threads: []})
        decided = all(len(times) >= 3 for times in trials.values())
        use = min(trials, key=lambda n: min(trials[n])) if decided else min(trials, key=lambda n: len(trials[n]))
        if decided and use == threads:
            return decode_forward(self.weights, self.cache, ids)  # nothing to switch
        torch.set_num_threads(use)
        try:
            t0 = time.perf_counter()
            logits = decode_forward(self.weights, self.cache, ids)
            if not decided:
                trials[use].append(time.perf_counter() - t0)
        finally:
            torch.set_num_threads(threads)
        return logits

    def _first_call(self, ids):
        weights = self.weights
        if not weights.compile_failed:
            try:
                if self.mode == "cuda_graph":
                    return self._capture(weights, self.cache, ids)
                if not self.static and ids.size(0) not in weights.compiled_batch_sizes:  # CPU, first of its kind
                    return self._compile_on_cpu(ids)
                return self.forward(weights, self.cache, ids)
            except Exception as e:  # a compiler or capture failure (a real error shows again below, uncompiled)
                print0(f"Engine: {self.mode} decoding failed ({type(e).__name__}: {str(e)[:300]}); "
                       "decoding uncompiled")
                weights.compile_failed = True
        self.mode, self.forward = "uncompiled", decode_forward
        if self.static:
            self.cache.sync_pos_tensor()
        return decode_forward(weights, self.cache, ids)

    def _compile_on_cpu(self, ids):
        import torch._inductor.config  # noqa: F401 (loaded by the first compile; patched before it)
        print0(f"Engine: compiling the decode step for batch size {ids.size(0)} (seconds; once per "
               "process, batch size and weights)")
        with (torch._inductor.config.patch(cpu_compile_settings(self.weights)),
              torch.compiler.config.patch(dynamic_sources=CPU_COMPILE_DYNAMIC)):
            logits = self.forward(self.weights, self.cache, ids)
        self.weights.compiled_batch_sizes.add(ids.size(0))
        return logits

    def _capture(self, weights, cache, ids):
        # Warm up on a side stream (lazy initialisations must not happen during capture). The warm-up is
        # the real step: it writes the keys and values that the replays will write again.
        self.static_ids = ids.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            decode_forward(weights, cache, self.static_ids)
        torch.cuda.current_stream().wait_stream(side)
        cache.sync_pos_tensor()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.static_logits = decode_forward(weights, cache, self.static_ids)
        graph.replay()
        self.graph = graph
        return self.static_logits


class Engine:
    """
    Streams tokens from a model: one batched prefill of the prompt, then one cheap step per token
    (DecodeStep on DecodeWeights: see above). generate yields a column of tokens per step,
    generate_batch runs to the end.

    dtype: what decoding computes in. None follows the caller: the autocast dtype if generate is called
    under torch.autocast, else the model's own (fp32). The prefill then runs under autocast in that dtype.
    decode_mode: "eager", "compile" or "cuda_graph" (DecodeStep); None = cuda_graph on CUDA, eager elsewhere.
    On CPU "compile" decodes 2-3x faster than eager at batch 1 once compiled, and compiling takes seconds
    (about 7 s at depth 4, more on a cold cache: dev/bench_engine.py), so it pays for long sessions (chat,
    evaluation), not for a few samples.
    """

    def __init__(self, model, tokenizer, dtype=None, decode_mode=None):
        if decode_mode not in (None, *DECODE_MODES):
            raise ValueError(f"decode mode must be one of {DECODE_MODES} (or None: the device's default), "
                             f"got {decode_mode!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.dtype = dtype
        self.decode_mode = decode_mode
        self._weights, self._weights_key = None, None

    def decode_weights(self, dtype, pack):
        """DecodeWeights of the model, rebuilt only when a parameter was changed (trained) or moved since."""
        params = list(self.model.parameters())
        key = (dtype, pack, [(p.data_ptr(), p._version) for p in params])
        if key != self._weights_key:
            self._weights, self._weights_key = DecodeWeights(self.model, dtype, pack), key
        return self._weights

    def _decode_step(self, cache, dtype, mode):
        if not hasattr(self.model, "transformer"):  # not our GPT, but following the KVCache protocol: its own forward
            return lambda ids: self.model(ids, kv_cache=cache)[:, -1, :]
        pack = mode == "eager" and can_pack_weights(cache.pos_tensor.device, dtype)
        return DecodeStep(self.decode_weights(dtype, pack), cache, mode)

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
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
        weight_dtype = self.model.lm_head.weight.dtype if hasattr(self.model, "lm_head") else torch.float32
        dtype = self.dtype
        if dtype is None:
            dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else weight_dtype
        mode = self.decode_mode or ("cuda_graph" if device.type == "cuda" else "eager")

        special = self.tokenizer.encode_special
        python_start, python_end = special("<|python_start|>"), special("<|python_end|>")
        output_start, output_end = special("<|output_start|>"), special("<|output_end|>")
        row_enders = {special("<|assistant_end|>"), self.tokenizer.get_bos_token_id()}

        # 1) prefill the prompt once, batch size 1, in one forward, into a cache sized for the whole
        # generation (rounded up, so compiled steps serve prompts of similar lengths); it never grows.
        capacity = -(-(len(tokens) + max_tokens) // 256) * 256
        kv_shape = dict(num_heads=config.n_kv_head, head_dim=config.n_embd // config.n_head, num_layers=config.n_layer)
        # On CPU the cache and attention stay fp32 whatever the decode dtype: bf16 attention was measured
        # 3-8x slower there (dev/bench_engine.py); elsewhere the cache is in the decode dtype.
        cache_dtype = torch.float32 if device.type == "cpu" else dtype
        prefill_cache = KVCache(1, seq_len=capacity, dtype=cache_dtype, device=device, **kv_shape)
        ids = torch.tensor([tokens], dtype=torch.long, device=device)  # (1, T)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != weight_dtype):
            # our GPT computes the last position's logits only; another model following the KVCache protocol, all
            last_only = {"last_only": True} if hasattr(self.model, "transformer") else {}
            logits = self.model(ids, kv_cache=prefill_cache, **last_only)[:, -1, :]  # (1, V)
        # every row samples its own first token from the shared prompt logits
        logits = logits.expand(num_samples, -1)  # (num_samples, V)

        # 2) one cache row per sample, starting from the shared prompt
        if num_samples == 1:
            cache = prefill_cache
        else:
            cache = KVCache(num_samples, seq_len=capacity, **kv_shape)
            cache.prefill(prefill_cache)
        del prefill_cache

        # 3) decode
        rows = [_Row() for _ in range(num_samples)]
        step = None  # made after the first token is out, so it does not delay it
        for i in range(max_tokens):
            if i > 0:
                step = step or self._decode_step(cache, dtype, mode)
                logits = step(ids)  # (num_samples, V)
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
