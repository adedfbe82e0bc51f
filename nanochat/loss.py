"""
The training loss without the full logits: lm_head -> soft-cap -> cross-entropy, chunk by chunk.

Computed over all B*T tokens at once, it would keep several (B*T, vocab) tensors alive for the backward
pass: 17 GB each in fp32 at the speedrun's batch (32 x 2048 tokens, vocab 65536). Instead the tokens go
through the head in chunks, and each chunk's logits exist only while that chunk is processed. For a mean
or sum the gradients are computed in the forward pass too (the loss is linear in each token's loss, so
backward only scales them): no logits are recomputed, the matmul work is that of the plain path.
"""

import math

import torch

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
    logits = (x @ weight.t()).to(precision)  # (n, V)
    if x.dtype == torch.bfloat16 and x.device.type == "cpu":
        # tanh(z) = 2 sigmoid(2z) - 1: on CPU the sigmoid's vectorised exp is cheaper than tanh (a compiled d4 chunk,
        # matmuls included: 17.9 -> 15.4 ms), and its rounding (~1e-7) is far below that of the bf16 matmul
        capped = logits.mul_(2 / softcap).sigmoid_().mul_(2 * softcap).sub_(softcap)
    else:
        capped = logits.div_(softcap).tanh_().mul_(softcap)
    if softcap + math.log(capped.size(1)) < math.log(torch.finfo(precision).max):
        # capped lies within +-softcap, so no row's sum of exps can overflow: no max subtracted first, a pass over
        # the chunk less (the fused kernel of a compiled CPU chunk, 256 x 8192: 2.2 -> 1.85 ms; eager 1.10 -> 0.93)
        logsumexp = capped.exp().sum(dim=-1).log()
    else:
        logsumexp = torch.logsumexp(capped, dim=-1)
    valid = targets >= 0
    safe_targets = torch.where(valid, targets, 0)[:, None]  # ignored rows read logit 0, then get loss 0
    loss = torch.where(valid, logsumexp - capped.gather(1, safe_targets).squeeze(1), 0.0)
    if grad_scale is None:
        return loss, None
    # d loss / d capped = softmax - one_hot(target); through the cap, d capped / d logits = 1 - tanh^2.
    # The one-hot as a comparison rather than a scatter: compiled, it fuses with the rest.
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
