"""
The GPT model: a decoder-only Transformer in the modern small-model style.

- rotary position embeddings (no learned positions), QK RMSNorm, grouped-query attention
- RMSNorm without learnable parameters: after the embedding, before each sub-block, before lm_head
- MLP with ReLU^2, no biases anywhere, untied embedding / lm_head, logit soft-capping

Parameter names (state_dict keys) and numerics follow nanochat at commit f37d45c, so a checkpoint
trained here loads into that code and gives the same logits.

The model owns its attention, with and without a KV cache (nanochat/engine.py: the cache only stores
keys, values and the position). With targets, forward() returns the loss without ever holding the
logits of the whole batch (nanochat/loss.py).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.distributed as dist

from nanochat.common import print0
from nanochat.loss import softcap_cross_entropy
from nanochat.muon import Muon, DistMuon
from nanochat.adamw import DistAdamW

LOGIT_SOFTCAP = 15.0  # logits = 15 tanh(logits / 15) keeps them in (-15, 15)


@dataclass
class GPTConfig:
    sequence_len: int = 1024
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 6  # query heads
    n_kv_head: int = 6  # key/value heads; fewer than n_head means grouped-query attention
    n_embd: int = 768


def soft_cap(logits):
    """The model's logits from the lm_head's: 15 tanh(x / 15), given fp32 (more exact, and faster on CPU than bf16).
    It is increasing, so the largest logits before it are the largest after it: a sampler may cap only the few it
    keeps (sampling.sample_next_token), instead of the whole vocabulary. (Rounding can tie capped logits that were not
    tied: fp32 ones a few ulps apart, or any past ~100, where the cap is within an ulp or two of 15. Ranking before
    the cap breaks such ties by the larger logit.)"""
    return LOGIT_SOFTCAP * torch.tanh(logits / LOGIT_SOFTCAP)


def norm(x):
    # RMSNorm with no weight; eps defaults to the dtype's machine epsilon
    return F.rms_norm(x, (x.size(-1),))


def apply_rotary_emb(x, cos, sin):
    """
    Rotate the two halves of each head of x (B, T, H, D): (x1, x2) -> (x1 cos + x2 sin, x2 cos - x1 sin), by the
    tables of GPT.rotary_tables (1, T, 1, D) = [cos, cos] and [sin, -sin]. Written as x cos + roll(x) sin, the
    same products and sums as the two halves apart, in 4 ops instead of 8. Compiled, the halves are swapped as a
    flip of a (2, D/2) view instead: the same values, but an index the generated kernels load as vectors, where
    roll's modular one became a gather per element (one d4 layer's q, k rotary + norm, fwd + bwd: 6.7 -> 3.2 ms).
    Eager, roll is the faster op.
    """
    half = x.size(-1) // 2
    if torch.compiler.is_compiling():
        swapped = x.unflatten(-1, (2, half)).flip(-2).flatten(-2)
    else:
        swapped = x.roll(half, dims=-1)
    return x * cos + swapped * sin


# On CPU, bf16 causal attention over short sequences is faster written as plain matmuls and a softmax
# (compiled: two bmm calls and one fused mask + softmax kernel) than through SDPA's CPU flash kernel, with
# errors against fp64 alike (dev/profile_step.py shows its share of a step). It holds the (B, H, T, T)
# scores, so larger problems, fp32 (the reference's numerics) and GPUs use SDPA.
EXPLICIT_ATTENTION_MAX_SCORES = 2 ** 24  # 64 MB of fp32 scores per layer
# The explicit route takes the queries in up to this many blocks, each against the keys up to its last query only:
# the masked scores past that are never computed (with 4 blocks, 3/8 of the square: three quarters of its masked
# half), and masked keys weigh exactly 0 either way. Forward + backward of one d4 layer in bf16 (T = 512),
# compiled: 45 -> 24 ms (2 blocks: 25 ms); eager 57 -> 38 ms. Blocks under 128 queries cost more in per-op
# overhead than they save (eager, T = 128 in 4 blocks: 4.0 -> 5.8 ms), so shorter sequences take fewer or one.
EXPLICIT_ATTENTION_QUERY_BLOCKS = 4
EXPLICIT_ATTENTION_MIN_BLOCK = 128


def causal_attention(q, k, v, enable_gqa, explicit_allowed=True):
    """
    Causal self-attention of q (B, H, T, D) over k, v (B, H_kv, T_k, D), SDPA's result, by the fastest route. With
    T_k > T the first T_k - T keys are a prefix (cached, or shared by the rows) that every query sees; the last T
    are the queries' own, seen causally. explicit_allowed=False: SDPA always (an inference prefill: without a
    backward to run, its kernel is the faster on CPU too).
    """
    B, H, T, D = q.shape
    T_k = k.size(2)
    explicit = (explicit_allowed and q.device.type == "cpu" and q.dtype == torch.bfloat16
                and k.dtype == v.dtype == torch.bfloat16 and B * H * T * T_k <= EXPLICIT_ATTENTION_MAX_SCORES)
    if not explicit:
        if T_k == T:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=enable_gqa)
        visible = torch.ones(T, T_k, dtype=torch.bool, device=q.device).tril(diagonal=T_k - T)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=visible, enable_gqa=enable_gqa)
    if enable_gqa:  # each key/value head serves H / H_kv consecutive query heads
        k, v = k.repeat_interleave(H // k.size(1), dim=1), v.repeat_interleave(H // v.size(1), dim=1)
    prefix = T_k - T
    block = -(-T // max(1, min(EXPLICIT_ATTENTION_QUERY_BLOCKS, T // EXPLICIT_ATTENTION_MIN_BLOCK)))
    outputs = []
    for start in range(0, T, block):
        end = min(T, start + block)
        seen = prefix + end  # the keys any query of this block may see
        scores = (q[:, :, start:end] @ k[:, :, :seen].transpose(-2, -1)).float() * D ** -0.5  # the softmax in fp32
        future = torch.ones(end - start, seen, dtype=torch.bool, device=q.device).triu(diagonal=prefix + start + 1)
        weights = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)
        outputs.append(weights.to(v.dtype) @ v[:, :, :seen])
    return torch.cat(outputs, dim=2) if len(outputs) > 1 else outputs[0]


def attend_one_query(q, keys, values):
    """
    Attention of one query position q (B, H, 1, D) over keys and values (B, H_kv, T, D), SDPA's result written
    out: compiled on CPU it fuses into the decode step's code, where SDPA's kernel, called per layer, was the largest
    share of a batch-8 step (dev/bench_engine.py --modes=compile); uncompiled, SDPA is the faster. The query is
    scaled before the product: scaling the scores after it is a form inductor rewrites back into an SDPA call.
    """
    B, H, _, D = q.shape
    grouped = q.reshape(B, keys.size(1), H // keys.size(1), D)  # the query heads sharing each key/value head
    weights = torch.softmax((grouped * D ** -0.5) @ keys.transpose(-2, -1), dim=-1)
    return (weights @ values).view(B, H, 1, D)


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        if config.n_embd % config.n_head != 0:
            raise ValueError(f"n_embd ({config.n_embd}) must be divisible by n_head ({config.n_head})")
        if config.n_kv_head > config.n_head or config.n_head % config.n_kv_head != 0:
            raise ValueError(f"n_head ({config.n_head}) must be a multiple of n_kv_head ({config.n_kv_head})")
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        self.c_q = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.c_qkv = None  # q, k, v stacked into one matrix, in copies prepared for decoding (nanochat/decode.py)

    def project_qkv(self, x):
        """x (B, T, C) -> the q and k heads side by side, (B, T, (H + H_kv) D), and the v heads, (B, T, H_kv D)."""
        if self.c_qkv is not None:  # one matmul instead of three (decoding: no backward keeps anything)
            return self.c_qkv(x).split([(self.n_head + self.n_kv_head) * self.head_dim,
                                        self.n_kv_head * self.head_dim], dim=-1)
        # Three matrices in training: Muon orthogonalises each on its own, as the reference does. v stays a tensor
        # of its own: attention's backward keeps it, and as a view of one with q and k it would keep their
        # pre-rotary values alive too, (B, T, 2C) per layer (6.7 GB at depth 20, 32 x 2048 tokens per step)
        return torch.cat([self.c_q(x), self.c_k(x)], dim=-1), self.c_v(x)

    def forward(self, x, cos, sin, kv_cache=None):
        B, T, C = x.size()
        H, H_kv, D = self.n_head, self.n_kv_head, self.head_dim
        qk, v = self.project_qkv(x)
        qk = norm(apply_rotary_emb(qk.view(B, T, H + H_kv, D), cos, sin))  # q and k together: rotary, then QK norm
        q, k, v = qk[:, :, :H], qk[:, :, H:], v.view(B, T, H_kv, D)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        if kv_cache is None:
            y = causal_attention(q, k, v, enable_gqa=H != H_kv)
        else:
            y = self.attend_with_cache(q, k, v, kv_cache)
        y = y.transpose(1, 2).reshape(B, T, C)  # heads side by side again
        return self.c_proj(y)

    def attend_with_cache(self, q, k, v, kv_cache):
        """
        Store k, v (B, H_kv, T, D) in the cache after the positions it holds, and attend q (B, H, T, D) over
        all of them: the cached prefix, then causally within the T new ones. The cache's dtype decides.
        A position held on the device (a tensor: fixed-shape decode steps, one token per row) attends over
        the cache's whole capacity with the positions not yet written masked out.
        """
        T, pos = q.size(2), kv_cache.pos
        keys, values = kv_cache.insert(self.layer_idx, k, v)  # (B, H_kv, pos + T or capacity, D)
        q = q.to(keys.dtype)
        gqa = self.n_head != self.n_kv_head
        if isinstance(pos, torch.Tensor):
            visible = (kv_cache.positions <= pos).view(1, -1)  # (1, capacity)
            return F.scaled_dot_product_attention(q, keys, values, attn_mask=visible, enable_gqa=gqa)
        if T == 1 and pos > 0:  # one new token sees everything
            if q.device.type == "cpu" and torch.compiler.is_compiling():
                return attend_one_query(q, keys, values)
            return F.scaled_dot_product_attention(q, keys, values, enable_gqa=gqa)
        # a prefill, or training rows after the prompt they share (nanochat/rl.py), which take training's route
        return causal_attention(q, keys, values, enable_gqa=gqa, explicit_allowed=torch.is_grad_enabled())


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())  # ReLU^2 (Primer, arXiv:2109.08668)


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, kv_cache=None):
        x = x + self.attn(norm(x), cos, sin, kv_cache)
        x = x + self.mlp(norm(x))
        return x


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(config.vocab_size, config.n_embd),
            "h": nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
        })
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Rotary tables for 10x the training length, so generation can run past it. They are
        # derived from the config, so they stay out of the checkpoint (persistent=False).
        self.rotary_seq_len = 10 * config.sequence_len
        cos, sin = self._rotary_tables()
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _rotary_tables(self, base=10000):
        """[cos, cos] and [sin, -sin] of every position's angles, (1, rotary_seq_len, 1, head_dim): see apply_rotary_emb."""
        device = self.transformer.wte.weight.device
        head_dim = self.config.n_embd // self.config.n_head
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
        angles = torch.outer(torch.arange(self.rotary_seq_len, dtype=torch.float32, device=device), inv_freq)
        # Round through bf16 as the reference does (it keeps the tables in bf16), but store fp32 so the
        # fp32 path does no mixed-dtype arithmetic; the values, and hence the logits, are identical.
        cos, sin = angles.cos().bfloat16().float(), angles.sin().bfloat16().float()
        cos, sin = torch.cat([cos, cos], dim=-1), torch.cat([sin, -sin], dim=-1)
        return cos[None, :, None, :], sin[None, :, None, :]

    @torch.no_grad()
    def init_weights(self):
        # Draw in module order (embedding, then each block's linears, then lm_head) so that a given seed
        # gives the same weights as the reference. Linear std 1/sqrt(fan_in) * min(1, sqrt(fan_out/fan_in))
        # follows arXiv:2310.17813; output projections start at zero so each block starts as identity.
        for module in self.modules():
            if isinstance(module, nn.Linear):
                fan_out, fan_in = module.weight.shape
                std = 1.0 / math.sqrt(fan_in) * min(1.0, math.sqrt(fan_out / fan_in))
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=1.0)
        nn.init.zeros_(self.lm_head.weight)
        for block in self.transformer.h:
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
        self.cos, self.sin = self._rotary_tables()  # buffers were empty after to_empty()
        # On CUDA the embedding is kept in bf16 (training runs under bf16 autocast there), as the reference does
        if self.get_device().type == "cuda":
            self.transformer.wte.to(dtype=torch.bfloat16)

    def get_device(self):
        return self.transformer.wte.weight.device

    def estimate_flops(self):
        """FLOPs per token for forward+backward: 6 per non-embedding weight plus attention (PaLM, arXiv:2204.02311)."""
        n_params = sum(p.numel() for p in self.parameters())
        n_embedding = self.transformer.wte.weight.numel()
        cfg = self.config
        head_dim = cfg.n_embd // cfg.n_head
        return 6 * (n_params - n_embedding) + 12 * cfg.n_layer * cfg.n_head * head_dim * cfg.sequence_len

    def setup_optimizers(self, unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02, weight_decay=0.0):
        """[AdamW for wte and lm_head, Muon for every matrix in the blocks]; Dist* versions under DDP."""
        matrix_params = list(self.transformer.h.parameters())
        embedding_params = list(self.transformer.wte.parameters())
        lm_head_params = list(self.lm_head.parameters())
        if len(matrix_params) + len(embedding_params) + len(lm_head_params) != len(list(self.parameters())):
            raise RuntimeError("setup_optimizers: a parameter is in none of the groups; assign it an optimizer")
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        # The AdamW LRs were tuned at width 768; scale them as 1/sqrt(width)
        lr_scale = (self.config.n_embd / 768) ** -0.5
        print0(f"Scaling the AdamW LRs by (n_embd/768)^-0.5 = {lr_scale:.6f}")
        adam_groups = [
            dict(params=lm_head_params, lr=unembedding_lr * lr_scale),
            dict(params=embedding_params, lr=embedding_lr * lr_scale),
        ]
        adam_kwargs = dict(betas=(0.8, 0.95), eps=1e-10, weight_decay=weight_decay)
        if distributed:
            adamw = DistAdamW(adam_groups, **adam_kwargs)
        else:
            # fused kernels exist for CUDA and CPU; other devices (e.g. older MPS builds) use the default
            fused = self.get_device().type in ("cuda", "cpu")
            adamw = torch.optim.AdamW(adam_groups, fused=fused, **adam_kwargs)
        muon = (DistMuon if distributed else Muon)(matrix_params, lr=matrix_lr, momentum=0.95)
        optimizers = [adamw, muon]
        for opt in optimizers:
            for group in opt.param_groups:
                group["initial_lr"] = group["lr"]  # LR schedules multiply this
        return optimizers

    def forward(self, idx, targets=None, kv_cache=None, loss_reduction="mean", last_only=False, capped=True,
                positions=None):
        """
        idx (B, T) -> logits (B, T, vocab) in fp32, or with targets (B, T) the loss. last_only=True returns
        the logits of the last position only, (B, 1, vocab): all a prefill needs, without the lm_head
        and soft-cap over the other T - 1 positions (half of a 500-token prefill at depth 4). positions (B,)
        returns those of one position per row, (B, 1, vocab): a padded batch's last prompt tokens.
        capped=False returns the lm_head's logits before soft_cap, in its dtype (bf16 under bf16 autocast), for a
        sampler that upcasts and caps only those it keeps.
        """
        B, T = idx.size()
        if idx.device != self.cos.device:
            raise ValueError(f"idx is on {idx.device} but the model is on {self.cos.device}; move one of them")
        cos, sin = self.rotary_tables(0 if kv_cache is None else kv_cache.pos, T)

        x = self.transformer.wte(idx)  # (B, T, n_embd)
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)  # rotate in the dtype of q and k, as the reference does
            cos, sin = cos.to(dtype), sin.to(dtype)
        else:  # the bf16 embedding of CUDA with fp32 matrices, used outside autocast
            x = x.to(torch.promote_types(x.dtype, self.lm_head.weight.dtype))
        x = norm(x)
        for block in self.transformer.h:
            x = block(x, cos, sin, kv_cache)
        x = norm(x)
        if kv_cache is not None:
            kv_cache.pos += T  # in place when the position is a tensor (a captured CUDA graph replays it)

        if targets is not None:  # the same loss as F.cross_entropy of the logits below, chunk by chunk
            return softcap_cross_entropy(x.view(B * T, -1), self.lm_head.weight, targets.reshape(-1),
                                         LOGIT_SOFTCAP, reduction=loss_reduction)
        if positions is not None:
            x = x[torch.arange(B, device=x.device), positions].unsqueeze(1)
        elif last_only:
            x = x[:, -1:]
        logits = self.lm_head(x)  # (B, T, vocab_size)
        return soft_cap(logits.float()) if capped else logits  # capped in fp32, also under bf16 autocast

    def rotary_tables(self, start, T):
        """The rotary tables of positions start .. start + T - 1; start may be a tensor on the device (T = 1)."""
        if isinstance(start, torch.Tensor):
            if T != 1:
                raise ValueError(f"a position held in a tensor is for decoding one token per row, got {T} tokens")
            return self.cos.index_select(1, start.view(1)), self.sin.index_select(1, start.view(1))
        if start + T > self.cos.size(1):
            raise ValueError(f"positions up to {start + T} exceed the rotary table ({self.cos.size(1)} = "
                             "10 x sequence_len); use a larger sequence_len in GPTConfig")
        return self.cos[:, start:start + T], self.sin[:, start:start + T]

    @torch.inference_mode()
    def generate(self, tokens, max_tokens, temperature=1.0, top_k=None, seed=42):
        """Naive sampler for a single sequence (no KV cache): re-runs the whole prefix for each token, yields ints."""
        if not isinstance(tokens, list):
            raise TypeError(f"generate expects a list of token ids, got {type(tokens).__name__}")
        device = self.get_device()
        rng = None
        if temperature > 0:
            rng = torch.Generator(device=device)
            rng.manual_seed(seed)
        ids = torch.tensor([tokens], dtype=torch.long, device=device)  # (1, T)
        for _ in range(max_tokens):
            logits = self.forward(ids)[:, -1, :]  # (1, vocab_size)
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                logits[logits < kth] = -float("inf")
            if temperature > 0:
                probs = F.softmax(logits / temperature, dim=-1)
                next_id = torch.multinomial(probs, num_samples=1, generator=rng)
            else:
                next_id = torch.argmax(logits, dim=-1, keepdim=True)
            ids = torch.cat((ids, next_id), dim=1)
            yield next_id.item()


def build_gpt(config, device="cpu"):
    """A GPT with fresh weights on `device`: shapes first on the meta device, so memory is allocated once."""
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    return model


def depth_config(depth, vocab_size, sequence_len):
    """
    The model of a given depth, nanochat's one dial: width 64 per layer, ceil(width/128) heads (dim ~128),
    each with its own keys and values. Depths whose width the heads do not divide are refused: the odd
    depths that work are those one below a power of two (1, 3, 7, 15, 31); every even depth works.
    """
    if depth < 1:
        raise ValueError(f"depth must be at least 1, got {depth}")
    width = 64 * depth
    num_heads = -(-width // 128)  # ceil division
    if width % num_heads != 0:
        raise ValueError(f"depth {depth} gives width {width}, which its {num_heads} heads do not divide: "
                         f"use depth {depth - 1} or {depth + 1}")
    return GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=depth, n_head=num_heads,
                     n_kv_head=num_heads, n_embd=width)
