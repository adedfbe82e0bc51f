"""
Time one training step of a small GPT, split into forward+backward and optimizer step, for each
precision choice, against the fp32 baseline measured in the same run (interleaved, so machine load
hits every variant alike). Prints the choices nanochat.hardware makes on this device.

    python -m dev.bench_step                         # depth 4, seq 512, batch 8, vocab 8192, CPU
    python -m dev.bench_step --threads=1 --repeats=5 # one thread: steadier on a busy machine
    python -m dev.bench_step --compile=true          # also torch.compile: compile time vs steady state

Wall time is the median over repeats. CPU time (process time, all threads) is shown too: with
--threads=1 it hardly depends on other processes sharing the machine; with several threads it is
inflated there by threads spin-waiting for each other.
"""

# Model: the size that gets timed
depth = 4  # n_layer; width is 64 * depth and heads are 128 wide, as in base_train
seq_len = 512  # tokens per sequence
batch_size = 8  # sequences per forward pass
vocab_size = 8192  # vocabulary size (the output layer is a large share of the work at this size)
# Measurement
repeats = 3  # timed repeats per variant (after one warm-up each); the median is reported
threads = 0  # torch threads (0 = PyTorch's default)
device_type = "cpu"  # cpu|cuda|mps
compile = "false"  # true = also time torch.compile(model) in fp32 and in the chosen precision

import time
import statistics
from contextlib import nullcontext


def timed(fn, device):
    """(wall seconds, process CPU seconds) of fn()."""
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - wall, time.process_time() - cpu


def main():
    from nanochat.configurator import configure
    configure(globals(), __file__)

    import torch
    from nanochat import hardware
    from nanochat.gpt import GPTConfig, build_gpt
    from nanochat.muon import newton_schulz

    if threads > 0:
        torch.set_num_threads(threads)
    device = torch.device(device_type)
    n_embd = 64 * depth
    n_head = max(1, -(-n_embd // 128))
    config = GPTConfig(sequence_len=seq_len, vocab_size=vocab_size, n_layer=depth, n_head=n_head, n_kv_head=n_head,
                       n_embd=n_embd)

    # The choices nanochat makes on this device
    print(f"device: {device} | torch {torch.__version__} | threads {torch.get_num_threads()}")
    if device.type == "cpu":
        print(f"CPU native bf16 (avx512_bf16/amx_bf16/bf16 flag): {hardware.cpu_has_native_bf16()}")
    print(f"bf16/fp32 matmul throughput (measured): {hardware.bf16_matmul_speedup(device):.2f}x")
    autocast_dtype = hardware.choose_autocast_dtype(device)
    ns_dtype = hardware.newton_schulz_dtype(device)
    print(f"chosen: autocast {autocast_dtype or 'off (fp32)'} | Newton-Schulz {ns_dtype}")
    print(f"peak matmul FLOP/s for MFU: bf16 {hardware.peak_flops(device, torch.bfloat16):.3g}, "
          f"fp32 {hardware.peak_flops(device, torch.float32):.3g}")

    torch.manual_seed(0)
    model = build_gpt(config, device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: depth {depth}, n_embd {n_embd}, n_head {n_head}, vocab {vocab_size}, {n_params:,} params | "
          f"batch {batch_size} x seq {seq_len}")
    data = torch.randint(0, vocab_size, (batch_size, seq_len + 1), device=device)
    inputs, targets = data[:, :-1], data[:, 1:]

    def fwd_bwd(net, dtype):
        def run():
            ctx = torch.amp.autocast(device_type=device.type, dtype=dtype) if dtype is not None else nullcontext()
            with ctx:
                loss = net(inputs, targets=targets)
            loss.backward()
        return run

    adamw, muon = model.setup_optimizers()

    def opt_step(ns):
        def run():
            muon.ns_dtype = ns
            adamw.step()
            muon.step()
        return run

    variants = {"fwd+bwd fp32": fwd_bwd(model, None)}
    if device.type != "cpu" or hardware.cpu_has_native_bf16():
        variants["fwd+bwd bf16 autocast"] = fwd_bwd(model, torch.bfloat16)
    else:
        print("bf16 autocast not timed: this CPU emulates bf16 (expect it many times slower than fp32)")
    compile_times = {}
    if compile == "true":
        compiled = torch.compile(model, dynamic=False)
        for name, dtype in [("fp32", None), ("bf16 autocast", torch.bfloat16)]:
            if dtype is not None and f"fwd+bwd {name}" not in variants:
                continue
            compile_times[name] = timed(fwd_bwd(compiled, dtype), device)  # first call compiles
            variants[f"fwd+bwd compiled {name}"] = fwd_bwd(compiled, dtype)
    # gradients for the optimizer steps come from one fp32 backward
    fwd_bwd(model, None)()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    variants["optimizer step, NS fp32"] = opt_step(torch.float32)
    variants["optimizer step, NS bf16"] = opt_step(torch.bfloat16)

    # Newton-Schulz alone: one batched call per shape vs one call per matrix (the reference's way)
    shapes = {}
    for group in muon.param_groups:
        shapes[tuple(group["params"][0].shape)] = len(group["params"])
    ns_inputs = [torch.randn(k, *shape, device=device) for shape, k in shapes.items()]
    for dt, label in [(torch.float32, "fp32"), (torch.bfloat16, "bf16")]:
        variants[f"NS batched {label}"] = lambda dt=dt: [newton_schulz(g, dtype=dt) for g in ns_inputs]
        variants[f"NS per matrix {label}"] = lambda dt=dt: [newton_schulz(m, dtype=dt) for g in ns_inputs for m in g]

    def run_variant(name, fn):
        if name.startswith("optimizer"):  # every optimizer step sees the same gradients
            for n, p in model.named_parameters():
                p.grad = grads[n].clone()
        result = timed(fn, device)
        model.zero_grad(set_to_none=True)
        return result

    results = {name: [] for name in variants}
    for name, fn in variants.items():  # warm-up
        run_variant(name, fn)
    for _ in range(repeats):  # interleaved, so load on the machine hits every variant alike
        for name, fn in variants.items():
            results[name].append(run_variant(name, fn))

    def med(name, i):
        return statistics.median(t[i] for t in results[name])

    print(f"\n{'variant':34s} {'wall ms':>9s} {'CPU ms':>9s} {'wall vs base':>12s} {'CPU vs base':>11s}")
    baselines = {"fwd+bwd": "fwd+bwd fp32", "optimizer": "optimizer step, NS fp32", "NS batched": "NS batched fp32",
                 "NS per": "NS batched fp32"}
    for name in variants:
        base = next(b for prefix, b in baselines.items() if name.startswith(prefix))
        print(f"{name:34s} {1000 * med(name, 0):9.1f} {1000 * med(name, 1):9.1f} "
              f"{med(base, 0) / med(name, 0):11.2f}x {med(base, 1) / med(name, 1):10.2f}x")
    for name, (wall, cpu) in compile_times.items():
        print(f"torch.compile first call ({name}): {wall:.1f} s wall, {cpu:.1f} s CPU")
    tokens = batch_size * seq_len
    best = min((med(n, 0), n) for n in variants if n.startswith("fwd+bwd"))
    print(f"\nfastest fwd+bwd: {best[1]} -> {tokens / best[0]:,.0f} tok/s "
          f"(plus optimizer step once per {tokens:,}-token micro-batch without gradient accumulation)")


if __name__ == "__main__":
    main()
