"""
Where the time of one training step goes: torch.profiler over compiled training steps (forward,
backward, gradient clipping, both optimizers) of the model base_train builds, with the precision
base_train would choose on this device. Prints the step split into matmul / attention / elementwise /
optimizer (ms per step and % of the step) and the largest ops outside the matmuls.

    python -m dev.profile_step                    # depth 4, 8 x 512 tokens, vocab 8192, CPU
    python -m dev.profile_step --dtype=float32    # the fp32 path
    python -m dev.profile_step --top=30           # more of the op list

Categories, by self time of the profiled ops: matmul = mm/addmm/linear kernels (forward, backward and
Newton-Schulz); attention = the SDPA kernels, or the explicit route's bmm and softmax kernels;
optimizer = everything inside the optimizers' step() apart from matmuls; elementwise = the rest of
forward+backward (the compiled graphs' fused kernels, copies, norms, the loss, clipping).
"""

# Model and batch: the shapes of dev/bench_cpu.sh
depth = 4  # n_layer; width is 64 * depth and heads are 128 wide, as in base_train
seq_len = 512  # tokens per sequence
batch_size = 8  # sequences per forward pass
vocab_size = 8192  # vocabulary size
# Measurement
dtype = "auto"  # auto|bfloat16|float32 (auto: base_train's choice for this device)
compile = "true"  # torch.compile the model, as base_train does
warmup = 3  # untimed steps first (compilation, allocator warm-up)
steps = 3  # profiled steps; the table shows the mean per step
threads = 0  # torch threads (0 = PyTorch's default)
top = 15  # how many non-matmul ops to list
device_type = "cpu"  # cpu|cuda

import time
from collections import defaultdict
from contextlib import nullcontext

MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear",
              "mkldnn::_linear_pointwise", "aten::_addmm_activation", "mkl::_mkl_linear", "onednn::")
# SDPA's kernels, or on the explicit route (gpt.causal_attention) its batched matmuls and fused softmax kernels
ATTENTION_OPS = ("scaled_dot_product", "flash_attention", "efficient_attention", "cudnn_attention", "_softmax")


def category(name, phase):
    if phase != "optimizer" and (name in ("aten::bmm", "aten::baddbmm") or any(op in name for op in ATTENTION_OPS)):
        return "attention"
    if any(name.startswith(op) or op in name for op in MATMUL_OPS):
        return "matmul"
    return "other"


def start_profiling(threads, device_type):
    """Set torch's thread count (0: its default) and name each compiled CPU kernel in the profile; the device."""
    import torch
    import torch._inductor.config
    if threads > 0:
        torch.set_num_threads(threads)
    torch._inductor.config.cpp.enable_kernel_profile = True
    return torch.device(device_type)


def main():
    from nanochat.configurator import configure
    configure(globals(), __file__)

    import torch
    from torch.profiler import profile, record_function, ProfilerActivity
    from nanochat import hardware
    from nanochat.gpt import GPTConfig, build_gpt

    device = start_profiling(threads, device_type)
    if device.type == "cpu":
        hardware.keep_freed_memory()  # as compute_init has it for base_train
    use_bf16 = (hardware.choose_autocast_dtype(device) == torch.bfloat16) if dtype == "auto" else dtype == "bfloat16"
    n_embd = 64 * depth
    n_head = max(1, -(-n_embd // 128))
    config = GPTConfig(sequence_len=seq_len, vocab_size=vocab_size, n_layer=depth, n_head=n_head, n_kv_head=n_head, n_embd=n_embd)
    torch.manual_seed(0)
    model = build_gpt(config, device)
    optimizers = model.setup_optimizers()
    net = torch.compile(model, dynamic=False) if compile == "true" else model
    autocast = torch.amp.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, vocab_size, (batch_size, seq_len), generator=generator).to(device),
                torch.randint(0, vocab_size, (batch_size, seq_len), generator=generator).to(device)) for _ in range(2)]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def train_step(i):
        x, y = batches[i % len(batches)]
        with record_function("## forward+backward"):
            with autocast:
                loss = net(x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        with record_function("## optimizer"):
            for opt in optimizers:
                opt.step()
        model.zero_grad(set_to_none=True)
        sync()

    t0 = time.perf_counter()
    for i in range(warmup):
        train_step(i)
    print(f"depth {depth}, {batch_size} x {seq_len} tokens, vocab {vocab_size}, {'bf16 autocast' if use_bf16 else 'fp32'}, "
          f"compile {compile}, {torch.get_num_threads()} threads; warm-up {time.perf_counter() - t0:.1f} s")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        for i in range(steps):
            train_step(i)
    wall_ms = (time.perf_counter() - t0) * 1000 / steps

    # Self time of every op, attributed to the phase ("## ..." range) that encloses it
    def phase_of(event):
        while event is not None and not event.name.startswith("## "):
            event = event.cpu_parent
        return event.name[3:] if event is not None else None

    use_device_time = device.type == "cuda"
    totals = defaultdict(float)
    by_op = defaultdict(float)
    for e in prof.events():
        if e.name.startswith("## "):
            continue
        self_us = e.self_device_time_total if use_device_time else e.self_cpu_time_total
        phase = phase_of(e) if self_us > 0 else None
        if phase is None:
            continue
        kind = category(e.name, phase)
        if kind == "other":
            kind = "optimizer" if phase == "optimizer" else "elementwise"
        totals[kind] += self_us / 1000
        if kind != "matmul":
            by_op[(kind, e.name)] += self_us / 1000

    step_ms = wall_ms
    print(f"\nstep: {wall_ms:.0f} ms wall ({batch_size * seq_len / wall_ms * 1000:,.0f} tok/s under the profiler)")
    accounted = 0.0
    for kind in ("matmul", "attention", "elementwise", "optimizer"):
        ms = totals[kind] / steps
        accounted += ms
        print(f"  {kind:12s} {ms:8.1f} ms  {100 * ms / step_ms:5.1f}%")
    print(f"  {'unattributed':12s} {step_ms - accounted:8.1f} ms  {100 * (step_ms - accounted) / step_ms:5.1f}%  (Python, dispatch, gaps)")
    flops = model.estimate_flops() * batch_size * seq_len
    peak = hardware.peak_flops(device, torch.bfloat16)
    print(f"MFU against the measured bf16 matmul peak ({peak / 1e9:.0f} GFLOP/s): {100 * flops / (wall_ms / 1000) / peak:.1f}% "
          f"(matmuls alone run at {100 * flops / (totals['matmul'] / steps / 1000) / peak:.0f}% of it)")
    print(f"\nlargest ops besides matmuls (ms per step, self time):")
    for (kind, name), ms in sorted(by_op.items(), key=lambda kv: -kv[1])[:top]:
        print(f"  {ms / steps:8.2f}  {kind:11s} {name[:100]}")


if __name__ == "__main__":
    main()
