"""
Our CPU training step with malloc keeping freed memory for reuse (hardware.keep_freed_memory, as compute_init
sets it on CPU) against glibc's default, which hands large freed blocks back to the kernel. malloc's settings
are process-wide, so each run is a process of its own: the two settings alternate, round after round, so that
background load hits both alike. Prints each run's median step time, page faults per step and peak resident
memory, then the ratio.

    python -m dev.bench_allocator                 # depth 4, 8 x 512 tokens, vocab 8192, 4 rounds
    python -m dev.bench_allocator --rounds=8 --steps=20
"""

depth = 4  # the model of dev/bench_cpu.sh: width 64 * depth, heads 128 wide
seq_len = 512
batch_size = 8
vocab_size = 8192
rounds = 4  # processes per setting, alternating
steps = 12  # timed steps per process (after 4 untimed: compilation, warm-up)
child = ""  # internal: "keep" or "glibc", a timed run under that setting

import json
import os
import resource
import statistics
import subprocess
import sys
import time

from nanochat.configurator import configure

configure(globals(), __file__)


def timed_run(keep):
    import torch
    from nanochat import hardware
    from nanochat.gpt import GPTConfig, build_gpt
    kept = keep and hardware.keep_freed_memory()  # False where malloc is not glibc's
    torch.manual_seed(0)
    config = GPTConfig(sequence_len=seq_len, vocab_size=vocab_size, n_layer=depth, n_head=max(1, 64 * depth // 128),
                       n_kv_head=max(1, 64 * depth // 128), n_embd=64 * depth)
    model = build_gpt(config)
    optimizers = model.setup_optimizers()
    compiled = torch.compile(model, dynamic=False)
    bf16 = hardware.choose_autocast_dtype("cpu") == torch.bfloat16
    g = torch.Generator().manual_seed(0)
    x, y = (torch.randint(0, vocab_size, (batch_size, seq_len), generator=g) for _ in range(2))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = compiled(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)

    for _ in range(4):
        step()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / steps
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the price of keeping: memory held
    return {"kept": kept, "ms": statistics.median(times) * 1000, "faults": faults, "peak_mb": peak_mb,
            "cpu": hardware.cpu_description()}


if child:
    print(json.dumps(timed_run(child == "keep")))
    sys.exit(0)

results = {"keep": [], "glibc": []}
for round_index in range(rounds):
    for setting in ("glibc", "keep") if round_index % 2 else ("keep", "glibc"):
        out = subprocess.run([sys.executable, "-m", "dev.bench_allocator", f"--child={setting}", f"--steps={steps}",
                              f"--depth={depth}", f"--seq_len={seq_len}", f"--batch_size={batch_size}",
                              f"--vocab_size={vocab_size}"], capture_output=True, text=True,
                             cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        if out.returncode != 0:
            raise SystemExit(f"the {setting} run failed:\n{out.stderr[-3000:]}")
        run = json.loads(out.stdout.strip().splitlines()[-1])
        results[setting].append(run)
        print(f"round {round_index + 1} {setting:5}: step {run['ms']:6.1f} ms, "
              f"{run['faults']:8,.0f} page faults per step, peak resident {run['peak_mb']:,.0f} MB",
              flush=True)
if not all(r["kept"] for r in results["keep"]):
    print("malloc here is not glibc's: keep_freed_memory changed nothing, both settings are the same")
print(f"\nCPU: {run['cpu']}; depth {depth}, {batch_size} x {seq_len} tokens, vocab {vocab_size}")
medians = {setting: statistics.median(r["ms"] for r in runs) for setting, runs in results.items()}
paired = sorted(round(g["ms"] / k["ms"], 2) for g, k in zip(results["glibc"], results["keep"]))
print(f"median step: kept {medians['keep']:.1f} ms, glibc's default {medians['glibc']:.1f} ms: "
      f"{medians['glibc'] / medians['keep']:.2f}x faster kept (per round: {paired})")
