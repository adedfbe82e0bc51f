"""
The GPT model: a decoder-only Transformer in the modern small-model style.

- rotary position embeddings (no learned positions), QK RMSNorm, grouped-query attention
- RMSNorm without learnable parameters: after the embedding, before each sub-block, before lm_head
- MLP with ReLU^2, no biases anywhere, untied embedding / lm_head, logit soft-capping

Parameter names (state_dict keys) and numerics follow nanochat at commit f37d45c, so a checkpoint
trained here loads into that code and gives the same logits.

With targets, forward() returns the loss without ever holding the logits of the whole batch: see
softcap_cross_entropy below.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.distributed as dist

from nanochat.common import print0
from nanochat.muon import Muon, DistMuon
from nanochat.adamw import DistAdamW


@dataclass
class GPTConfig:
    sequence_len: int = 1024
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 6  # query heads
    n_kv_head: int = 6  # key/value heads; fewer than n_head means grouped-query attention
    n_embd: int = 768


def norm(x):
    # RMSNorm with no weight; eps defaults to the dtype's machine epsilon
    return F.rms_norm(x, (x.size(-1),))


def apply_rotary_emb(x, cos, sin):
    """Rotate the two halves of the last dim of x (B, T, H, D) by the angles in cos/sin (1, T, 1, D/2)."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    half = x.size(-1) // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos + x2 * sin, x1 * (-sin) + x2 * cos], dim=-1)


# ---------------------------------------------------------------------------------------------------
# The loss without the full logits. lm_head -> soft-cap -> cross-entropy over all B*T tokens at once
# would keep several (B*T, vocab) tensors alive for the backward pass: 17 GB each in fp32 at the
# speedrun's batch (32 x 2048 tokens, vocab 65536). Instead the tokens go through the head in chunks,
# and each chunk's logits exist only while that chunk is processed. For a mean or sum the gradients
# are computed in the forward pass too (the loss is linear in each token's loss, so backward only
# scales them): no logits are recomputed, the matmul work is that of the plain path.

# Chunk size: at least LOSS_CHUNK_LOGITS logits (rows x vocab; 8 MB in fp32) and LOSS_MIN_ROWS rows,
# since each chunk also adds its (vocab x n_embd) share to the lm_head gradient: with few rows that
# accumulation, not the matmuls, would set the pace. On GPUs larger chunks keep the kernels big.
# torch.compile unrolls the loop over chunks, so there the number of chunks is capped.
LOSS_CHUNK_LOGITS = 2 ** 21
LOSS_CHUNK_LOGITS_CUDA = 2 ** 27
LOSS_MIN_ROWS = 256
LOSS_MAX_CHUNKS_COMPILED = 16


def _loss_chunks(num_rows, vocab_size, device):
    rows = max((LOSS_CHUNK_LOGITS_CUDA if device.type == "cuda" else LOSS_CHUNK_LOGITS) // vocab_size, LOSS_MIN_ROWS)
    if torch.compiler.is_compiling():
        rows = max(rows, -(-num_rows // LOSS_MAX_CHUNKS_COMPILED))
    return [(start, min(start + rows, num_rows)) for start in range(0, num_rows, rows)]


def _softcap_ce_chunk(x, weight, targets, softcap, grad_scale=None, grad_weight=None):
    """
    Cross-entropy per row of x (n, C) against targets (n,) (-1 = ignored, loss 0), of the logits
    softcap * tanh(x @ weight.T / softcap), computed in fp32 (or fp64) from the matmul in x's dtype.
    With grad_scale (a scalar or (n,) tensor), also the gradient of sum(grad_scale * loss) with respect
    to x, in that same precision, and that with respect to weight is added to grad_weight (V, C).
    In-place ops: eager mode makes fewer passes over the chunk.
    """
    precision = torch.promote_types(x.dtype, torch.float32)
    capped = (x @ weight.t()).to(precision).div_(softcap).tanh_().mul_(softcap)  # (n, V)
    logsumexp = torch.logsumexp(capped, dim=-1)
    valid = targets >= 0
    safe_targets = torch.where(valid, targets, 0)[:, None]  # ignored rows read logit 0, then get loss 0
    loss = torch.where(valid, logsumexp - capped.gather(1, safe_targets).squeeze(1), 0.0)
    if grad_scale is None:
        return loss, None
    # d loss / d capped = softmax - one_hot(target); through the cap, d capped / d logits = 1 - tanh^2.
    # The one-hot as a comparison rather than a scatter: compiled, it fuses with the rest (measured 10-20%
    # less CPU time for the loss than a scatter_add_).
    grad_logits = torch.sub(capped, logsumexp[:, None]).exp_()
    is_target = torch.arange(capped.size(1), device=x.device) == safe_targets  # (n, V)
    grad_logits = torch.where(is_target, grad_logits - 1, grad_logits)
    tanh_slope = capped.div_(softcap).square_().neg_().add_(1)  # capped is not needed any more
    grad_logits.mul_(tanh_slope).mul_(torch.where(valid, grad_scale, 0.0)[:, None])
    grad_logits = grad_logits.to(x.dtype)
    _add_matmul_(grad_weight, grad_logits.t(), x)
    return loss, (grad_logits @ weight).to(precision)


@torch.library.custom_op("nanochat::add_matmul_", mutates_args=("out",))
def _add_matmul_(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """
    out += a @ b, the product in a's dtype (bf16 under autocast), the sum in out's (fp32). An opaque op,
    so that torch.compile adds each chunk's share of the lm_head gradient as soon as it exists: as plain
    ops, it fused the additions into one kernel at the end and kept every chunk's share alive till then.
    """
    if out.dtype == a.dtype:
        out.addmm_(a, b)
    else:
        out.add_(a @ b)


class _SoftcapCrossEntropy(torch.autograd.Function):
    """Chunked lm_head + soft-cap + cross-entropy with its own backward; x and weight share one dtype."""

    @staticmethod
    def forward(ctx, x, weight, targets, softcap, reduction):
        ctx.reduction, ctx.softcap, ctx.dtype = reduction, softcap, x.dtype
        chunks = _loss_chunks(x.size(0), weight.size(0), x.device)
        if reduction == "none":  # per-token gradients do not factor out: recompute in backward
            losses = [_softcap_ce_chunk(x[a:b], weight, targets[a:b], softcap)[0] for a, b in chunks]
            ctx.save_for_backward(x, weight, targets)
            return torch.cat(losses)
        # mean over the counted tokens (0/0 = nan when none is, like F.cross_entropy), or sum
        precision = torch.promote_types(x.dtype, torch.float32)
        grad_scale = torch.ones((), dtype=precision, device=x.device)
        if reduction == "mean":
            grad_scale = grad_scale / (targets >= 0).sum()
        total = torch.zeros((), dtype=precision, device=x.device)
        grad_x = torch.empty(x.shape, dtype=precision, device=x.device)
        grad_weight = torch.zeros(weight.shape, dtype=precision, device=x.device)
        for a, b in chunks:
            loss, grad_x[a:b] = _softcap_ce_chunk(x[a:b], weight, targets[a:b], softcap, grad_scale, grad_weight)
            total = total + loss.sum()
        ctx.save_for_backward(grad_x, grad_weight)
        return total * grad_scale

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.reduction == "none":
            x, weight, targets = ctx.saved_tensors
            grad_x = torch.empty(x.shape, dtype=grad_output.dtype, device=x.device)
            grad_weight = torch.zeros(weight.shape, dtype=grad_output.dtype, device=x.device)
            for a, b in _loss_chunks(x.size(0), weight.size(0), x.device):
                _, grad_x[a:b] = _softcap_ce_chunk(x[a:b], weight, targets[a:b], ctx.softcap, grad_output[a:b], grad_weight)
        else:
            grad_x, grad_weight = ctx.saved_tensors
            grad_x, grad_weight = grad_x * grad_output, grad_weight * grad_output
        return grad_x.to(ctx.dtype), grad_weight.to(ctx.dtype), None, None, None


def softcap_cross_entropy(x, weight, targets, softcap, reduction="mean"):
    """
    F.cross_entropy(softcap * tanh(x @ weight.T / softcap), targets, ignore_index=-1, reduction=reduction)
    for x (N, C), weight (V, C), targets (N,), without materialising the (N, V) logits or their gradient.
    Under autocast the matmuls run in the autocast dtype, the soft-cap, softmax and loss in fp32.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be mean|sum|none, got {reduction!r}")
    device_type = x.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
    x, weight = x.to(dtype), weight.to(dtype)  # autograd carries the gradients back through these casts
    with torch.autocast(device_type, enabled=False):
        if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
            return _SoftcapCrossEntropy.apply(x, weight, targets, softcap, reduction)
        losses = torch.cat([_softcap_ce_chunk(x[a:b], weight, targets[a:b], softcap)[0]
                            for a, b in _loss_chunks(x.size(0), weight.size(0), x.device)])
        if reduction == "none":
            return losses
        return losses.sum() / (targets >= 0).sum() if reduction == "mean" else losses.sum()


# On CPU, bf16 causal attention over short sequences is twice as fast written as plain matmuls and a softmax
# (compiled: two bmm calls and one fused mask + softmax kernel) as through SDPA's CPU flash kernel: 18 vs 34 ms
# forward + backward per layer at 8 x 2 heads x 512 x 128, with errors against fp64 alike (its share of a
# training step: dev/profile_step.py). It holds the (B, H, T, T) scores, so larger problems, fp32 (the
# reference's numerics) and GPUs use SDPA.
EXPLICIT_ATTENTION_MAX_SCORES = 2 ** 24  # 64 MB of fp32 scores per layer


def causal_attention(q, k, v, enable_gqa):
    """Causal self-attention of q (B, H, T, D) over k, v (B, H_kv, T, D): SDPA's result, by the fastest route."""
    B, H, T, D = q.shape
    explicit = (q.device.type == "cpu" and q.dtype == torch.bfloat16 and k.dtype == v.dtype == torch.bfloat16
                and B * H * T * T <= EXPLICIT_ATTENTION_MAX_SCORES)
    if not explicit:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=enable_gqa)
    if enable_gqa:  # each key/value head serves H / H_kv consecutive query heads
        k, v = k.repeat_interleave(H // k.size(1), dim=1), v.repeat_interleave(H // v.size(1), dim=1)
    scores = (q @ k.transpose(-2, -1)).float() * D ** -0.5  # (B, H, T, T); the softmax in fp32
    future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(diagonal=1)
    weights = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)
    return weights.to(v.dtype) @ v


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

    def forward(self, x, cos, sin, kv_cache):
        B, T, C = x.size()
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        q, k = apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)
        q, k = norm(q), norm(k)  # QK norm, after rotary (as in the reference)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)

        if kv_cache is None:
            y = causal_attention(q, k, v, enable_gqa=self.n_head != self.n_kv_head)
        else:
            y = kv_cache.attend(self.layer_idx, q, k, v)  # stores k, v; attends over the cached prefix too

        y = y.transpose(1, 2).contiguous().view(B, T, C)  # heads side by side again
        return self.c_proj(y)


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

    def forward(self, x, cos, sin, kv_cache):
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
        device = self.transformer.wte.weight.device
        head_dim = self.config.n_embd // self.config.n_head
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
        angles = torch.outer(torch.arange(self.rotary_seq_len, dtype=torch.float32, device=device), inv_freq)
        # Round through bf16 as the reference does (it keeps the tables in bf16), but store fp32 so the
        # fp32 path does no mixed-dtype arithmetic; the values, and hence the logits, are identical.
        cos, sin = angles.cos().bfloat16().float(), angles.sin().bfloat16().float()
        return cos[None, :, None, :], sin[None, :, None, :]  # (1, T, 1, head_dim/2)

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

    def forward(self, idx, targets=None, kv_cache=None, loss_reduction="mean", last_only=False):
        """
        idx (B, T) -> logits (B, T, vocab) in fp32, or with targets (B, T) the loss. last_only=True returns
        the logits of the last position only, (B, 1, vocab): all a prefill needs, without the lm_head
        and soft-cap over the other T - 1 positions (half of a 500-token prefill at depth 4).
        """
        B, T = idx.size()
        if idx.device != self.cos.device:
            raise ValueError(f"idx is on {idx.device} but the model is on {self.cos.device}; move one of them")
        if kv_cache is None:
            if T > self.cos.size(1):
                raise ValueError(f"positions up to {T} exceed the rotary table "
                                 f"({self.cos.size(1)} = 10 x sequence_len); use a larger sequence_len in GPTConfig")
            cos, sin = self.cos[:, :T], self.sin[:, :T]
        else:
            cos, sin = kv_cache.rotary(self.cos, self.sin, T)  # positions continue after the cached ones

        x = self.transformer.wte(idx)  # (B, T, n_embd)
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.lm_head.weight.dtype)  # the bf16 embedding of CUDA, used outside autocast
        x = norm(x)
        for block in self.transformer.h:
            x = block(x, cos, sin, kv_cache)
        x = norm(x)

        softcap = 15.0  # logits = 15 tanh(logits / 15) keeps them in (-15, 15)
        if targets is not None:  # the same loss as F.cross_entropy of the logits below, chunk by chunk
            return softcap_cross_entropy(x.view(B * T, -1), self.lm_head.weight, targets.reshape(-1),
                                         softcap, reduction=loss_reduction)
        if last_only:
            x = x[:, -1:]
        logits = self.lm_head(x)  # (B, T, vocab_size)
        logits = softcap * torch.tanh(logits / softcap)
        return logits.float()  # sampling wants fp32 even under bf16 autocast

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
