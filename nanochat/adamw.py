"""
DistAdamW: AdamW over a torch.distributed group with sharded optimizer state (ZeRO-2 style), for
training without DDP wrapping. On a single process nanochat uses torch.optim.AdamW instead; the
update here is the same formula as torch's (eps added after the bias correction of the second moment),
so one step on N processes matches one step of torch.optim.AdamW on the concatenated batch.

Per parameter: reduce-scatter the gradient along dim 0 (each rank gets the mean gradient of its rows),
update those rows with this rank's share of exp_avg / exp_avg_sq, all-gather the rows back.
A parameter whose dim 0 does not divide by the world size is all-reduced and updated whole on every
rank instead (its state is then replicated); nanochat's embedding and lm_head have vocab_size rows,
normally a multiple of the world size.
"""

import torch
import torch.distributed as dist

from nanochat.collectives import start_reduce_scatter_sum, start_all_gather


class DistAdamW(torch.optim.Optimizer):
    def __init__(self, param_groups, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("DistAdamW needs torch.distributed initialised (e.g. under torchrun); "
                               "use torch.optim.AdamW otherwise")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        super().__init__(param_groups, defaults)

    @torch.no_grad()
    def step(self):
        rank, world_size = dist.get_rank(), dist.get_world_size()

        # 1) start averaging every gradient; sharded rows where dim 0 divides by world_size
        pending = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    raise RuntimeError("DistAdamW.step(): a parameter has no gradient; "
                                       "run backward() on every rank first")
                if p.size(0) % world_size == 0:
                    work, grad = start_reduce_scatter_sum(p.grad, world_size, rank)
                    rows = p.size(0) // world_size
                    p_part = p[rank * rows:(rank + 1) * rows]  # a view: updating it updates p
                else:
                    work, grad, p_part = dist.all_reduce(p.grad, async_op=True), p.grad, p
                pending.append((group, p, p_part, work, grad))

        # 2) update our rows as each gradient arrives, then share them
        gathers = []
        for group, p, p_part, work, grad in pending:
            work.wait()
            grad.div_(world_size)
            self._adamw_update(group, p, p_part, grad)
            if p_part is not p:
                gathers.append(start_all_gather(p, p_part.clone()))  # clone: input must not alias the output
        for work in gathers:
            work.wait()

    def _adamw_update(self, group, p, p_part, grad):
        beta1, beta2 = group["betas"]
        lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p_part)
            state["exp_avg_sq"] = torch.zeros_like(p_part)
        state["step"] += 1
        step = state["step"]
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        if weight_decay != 0:
            p_part.mul_(1 - lr * weight_decay)  # decoupled weight decay (Loshchilov & Hutter)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias_correction1 = 1 - beta1 ** step
        bias_correction2_sqrt = (1 - beta2 ** step) ** 0.5
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
        p_part.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)
