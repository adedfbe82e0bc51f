"""
Muon: SGD with Nesterov momentum whose update for each weight matrix is replaced by (approximately)
the nearest semi-orthogonal matrix, computed with a Newton-Schulz iteration.
https://kellerjordan.github.io/posts/muon/ ; the design here follows modded-nanogpt and nanochat.

Muon runs on one process; DistMuon shards the work over a torch.distributed group (ZeRO-2 style):
gradients are summed with a reduce-scatter so each rank receives only the matrices it owns, it keeps
momentum for those alone, updates them, and an all-gather sends the new weights to every rank.
Both group matrices by shape so each shape is orthogonalised in one batched call.
"""

import torch
import torch.distributed as dist
from torch import Tensor

from nanochat.collectives import start_reduce_scatter_sum, start_all_gather
from nanochat.hardware import newton_schulz_dtype

# Quintic coefficients chosen to maximise the slope at zero (Keller Jordan); with 5 steps the singular
# values land in roughly [0.5, 1.5] rather than exactly 1, which trains just as well.
NS_COEFFS = (3.4445, -4.7750, 2.0315)


def newton_schulz(G: Tensor, steps: int = 5, dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """Orthogonalise each matrix of G (..., rows, cols); returns a tensor of `dtype`."""
    a, b, c = NS_COEFFS
    X = G.to(dtype).reshape(-1, *G.shape[-2:])  # (batch, rows, cols)
    tall = G.size(-2) > G.size(-1)
    if tall:
        X = X.mT  # iterate on the wide orientation: X @ X.mT is then the smaller Gram matrix
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # Frobenius norm >= spectral norm, so sigma_max <= 1
    for _ in range(steps):
        A = X @ X.mT
        # B = b A + c A A, then X = a X + B X: each one batched matmul with the scaled sum folded in (one rounding
        # instead of three or four, no passes of their own for the scalings and sums: 69 -> 55 ms per d4 step on CPU)
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)
        X = torch.baddbmm(X, B, X, beta=a)
    if tall:
        X = X.mT
    return X.reshape(G.shape)


class Muon(torch.optim.Optimizer):
    """
    Muon for 2D parameters (the matrices inside the Transformer blocks). Do not use it for embeddings,
    the output head or 0/1-D parameters: give those to AdamW.

    lr: step size; the update is also scaled by sqrt(max(1, rows/cols)) so tall matrices move as much
        per element as square ones.
    momentum, nesterov: SGD momentum, applied before orthogonalisation.
    ns_steps: Newton-Schulz iterations.
    The Newton-Schulz dtype is picked per device by nanochat.hardware (bf16 where bf16 matmuls are
    fast, fp32 elsewhere) and can be overridden by setting the attribute `ns_dtype` after construction.
    """

    def __init__(self, params, lr=0.02, momentum=0.95, nesterov=True, ns_steps=5):
        params = list(params)
        if not params:
            raise ValueError("Muon got no parameters")
        bad = [tuple(p.shape) for p in params if p.ndim != 2]
        if bad:
            raise ValueError(f"Muon only handles 2D matrices, got shapes {bad}; give other parameters to AdamW")
        # one group per shape, in a fixed order so every rank agrees on ownership
        shapes = sorted({tuple(p.shape) for p in params})
        groups = [dict(params=[p for p in params if tuple(p.shape) == shape]) for shape in shapes]
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps)
        super().__init__(groups, defaults)
        self.ns_dtype = newton_schulz_dtype(params[0].device)

    def _check_grads(self):
        missing = [i for g in self.param_groups for i, p in enumerate(g["params"]) if p.grad is None]
        if missing:
            raise RuntimeError(f"{type(self).__name__}.step(): {len(missing)} parameters have no gradient; "
                               "run backward() first, and do not give Muon parameters that are unused in forward")

    def _update(self, group, params, grads: Tensor):
        """Momentum + orthogonalised step for `params` (a list of k same-shape matrices) given grads (k, rows, cols)."""
        momentum = group["momentum"]
        for p, g in zip(params, grads):
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(g)
            buf = state["momentum_buffer"]
            buf.lerp_(g, 1 - momentum)  # buf = momentum * buf + (1 - momentum) * g
            if group["nesterov"]:
                g.lerp_(buf, momentum)  # look-ahead: momentum * buf + (1 - momentum) * g
            else:
                g.copy_(buf)
        update = newton_schulz(grads, steps=group["ns_steps"], dtype=self.ns_dtype).to(grads.dtype)
        rows, cols = grads.shape[-2:]
        alpha = -group["lr"] * max(1.0, rows / cols) ** 0.5
        for p, u in zip(params, update):
            p.add_(u, alpha=alpha)

    @torch.no_grad()
    def step(self):
        self._check_grads()
        for group in self.param_groups:
            params = group["params"]
            grads = torch.stack([p.grad for p in params])  # (k, rows, cols), a copy: p.grad is left untouched
            self._update(group, params, grads)


class DistMuon(Muon):
    """
    Muon over a torch.distributed group, for training without DDP wrapping: call it after backward()
    on every rank, with each rank's local gradients. Within each shape group the matrices are split in
    contiguous chunks, rank r owning chunk r; momentum lives only on the owner. Works with NCCL and gloo.
    """

    def __init__(self, params, lr=0.02, momentum=0.95, nesterov=True, ns_steps=5):
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("DistMuon needs torch.distributed initialised (e.g. under torchrun); use Muon otherwise")
        super().__init__(params, lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps)

    @torch.no_grad()
    def step(self):
        self._check_grads()
        rank, world_size = dist.get_rank(), dist.get_world_size()

        # 1) start summing gradients; each rank receives the chunk of each shape group that it owns
        pending = []
        for group in self.param_groups:
            params = group["params"]
            chunk = -(-len(params) // world_size)  # ceil: matrices per rank, the last ranks padded with zeros
            full = params[0].grad.new_zeros((chunk * world_size, *params[0].shape))
            torch.stack([p.grad for p in params], out=full[:len(params)])
            pending.append((chunk, *start_reduce_scatter_sum(full, world_size, rank)))

        # 2) as each sum arrives: average, update the owned matrices, start sending them to everyone
        gathers = []
        for group, (chunk, work, grads) in zip(self.param_groups, pending):
            params = group["params"]
            work.wait()
            grads.div_(world_size)
            owned = params[rank * chunk:(rank + 1) * chunk]  # may be shorter than chunk, or empty
            if owned:
                self._update(group, owned, grads[:len(owned)])
            shard = params[0].new_zeros((chunk, *params[0].shape))
            if owned:
                torch.stack(owned, out=shard[:len(owned)])
            gathered = params[0].new_empty((chunk * world_size, *params[0].shape))
            gathers.append((params, gathered, start_all_gather(gathered, shard)))

        # 3) copy the new weights back into the parameters
        for params, gathered, work in gathers:
            work.wait()
            for p, new in zip(params, gathered):
                p.copy_(new)
