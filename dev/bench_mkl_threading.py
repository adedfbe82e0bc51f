"""
What nanochat's fixed MKL threading costs, and whether it changes the numbers on this machine. compute_init sets
torch's thread count explicitly, which turns MKL's dynamic threading off for the rest of the process (a fresh
process's default: MKL picks the threads of each fp32 matmul itself, one inside torch's parallel loops). Before,
the first set_num_threads later in the process (the Engine's decode step) switched it, and on MKL's Intel code
paths the CPU attention backward's matmuls then summed in another order: resume was not exact (issue 26).

One fp32 training step (forward, backward, optimizers) of a small GPT, in processes of both kinds started in
turn (MKL cannot be put back into a fresh process's state), so that machine load hits both alike:

    python -m dev.bench_mkl_threading                              # depth 4, seq 512, batch 8, vocab 8192
    python -m dev.bench_mkl_threading --threads=4 --rounds=5
    bash dev/mkl_intel_path.sh python -m dev.bench_mkl_threading   # MKL's Intel code paths on an AMD CPU

It also says whether the two kinds compute bit-identical gradients from the same weights (perturbed from the
initialisation, so that no matrix of the backward is zero). bf16 matmuls run in oneDNN, not MKL: fp32 only.
"""

depth = 4  # n_layer; width 64 * depth, heads 128 wide, as in base_train
seq_len = 512
batch_size = 8
vocab_size = 8192
rounds = 3  # processes of each kind, started in turn; the median step time over all of them is reported
steps = 3  # timed steps per process, after one warm-up step
threads = 0  # torch threads (0 = PyTorch's default)
mode = ""  # internal: "fresh" or "fixed" runs one measuring process and prints its result as JSON

import json
import os
import statistics
import subprocess
import sys
import time
import zlib

from nanochat.configurator import configure

user_config = configure(globals(), __file__)


def measure(fixed):
    """(CRC-32 of the gradients of one step from the same weights, [seconds of each timed step])."""
    import torch
    from nanochat.gpt import GPTConfig, build_gpt
    if fixed:
        torch.set_num_threads(threads or torch.get_num_threads())  # what compute_init does
    n_head = max(1, -(-64 * depth // 128))
    torch.manual_seed(0)
    model = build_gpt(GPTConfig(sequence_len=seq_len, vocab_size=vocab_size, n_layer=depth, n_head=n_head,
                                n_kv_head=n_head, n_embd=64 * depth))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p), alpha=0.02)
    data = torch.randint(0, vocab_size, (batch_size, seq_len + 1))
    inputs, targets = data[:, :-1], data[:, 1:]
    model(inputs, targets).backward()
    crc = 0
    for p in model.parameters():
        crc = zlib.crc32(p.grad.contiguous().view(torch.uint8).numpy().tobytes(), crc)
    optimizers = model.setup_optimizers()
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        model(inputs, targets).backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        if i > 0:  # the first step warms up
            times.append(time.perf_counter() - t0)
    return crc, times


if mode:
    crc, times = measure(mode == "fixed")
    print(json.dumps({"crc": crc, "times": times}))
    raise SystemExit(0)

kinds = {"fresh": "MKL dynamic (a fresh process)", "fixed": "MKL fixed (compute_init)"}
results = {kind: [] for kind in kinds}
settings = [f"--{name}={value}" for name, value in user_config.items() if name != "mode"]
env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
for round_ in range(rounds):
    for kind in kinds:
        result = subprocess.run([sys.executable, "-m", "dev.bench_mkl_threading", *settings, f"--mode={kind}"],
                                capture_output=True, text=True, env=env)
        if result.returncode != 0:
            raise SystemExit(result.stdout[-2000:] + result.stderr[-2000:])
        results[kind].append(json.loads(result.stdout.strip().splitlines()[-1]))
    print(f"round {round_ + 1}/{rounds} done", flush=True)
crcs = {kind: {r["crc"] for r in runs} for kind, runs in results.items()}
print(f"depth {depth}, batch {batch_size} x seq {seq_len}, vocab {vocab_size}, fp32, threads "
      f"{threads or 'default'}")
print(f"each kind computes the same gradients in every process: {all(len(c) == 1 for c in crcs.values())}")
print(f"the two kinds compute bit-identical gradients: {crcs['fresh'] == crcs['fixed']}")
base = statistics.median(t for r in results["fresh"] for t in r["times"])
for kind, label in kinds.items():
    median = statistics.median(t for r in results[kind] for t in r["times"])
    print(f"{label:32s} {1000 * median:8.1f} ms per step  ({median / base:.3f}x)")
