"""
In-process A/B of one training step (forward, backward, clipping where the script clips, optimizers) at
the shapes of dev/bench_cpu.sh: ours as our base_train runs it on this device, the reference nanochat
(karpathy/nanochat at f37d45c) as its base_train runs it on CPU (torch.compile, fp32), and optionally
upstream nanochat (a later checkout, e.g. master of July 2026) in its bf16 mode (NANOCHAT_DTYPE=bfloat16,
its default sliding-window pattern). The steps are interleaved, in a new random order each round, so that
background load hits all alike and no contender always runs right after the same one.

    python -m dev.bench_train_ab --ref_dir=/path/to/reference                  # or REF_DIR=...
    python -m dev.bench_train_ab --ref_dir=... --upstream_dir=/path/to/upstream --steps=20
    python -m dev.bench_train_ab --ref_dir=... --ours_fp32=false                 # skip our fp32 row
    python -m dev.bench_train_ab --ref_dir=... --compare_dir=/path/to/ours/before  # ours before a change, too

The upstream model is a different design (value embeddings, sliding windows...), so only its speed is
comparable, not its loss.

malloc's settings are process-wide, so all contenders run under one: by default ours, which keeps freed memory
for reuse as compute_init has it on CPU (hardware.keep_freed_memory). The reference's and upstream's programs do
not, so this understates ours. --keep_freed_memory=false runs all under glibc's own; the table shows each
contender's page faults per step.
"""

ref_dir = ""  # checkout of the reference nanochat (f37d45c); default: $REF_DIR
upstream_dir = ""  # checkout of upstream nanochat to include in bf16 mode; default: $UPSTREAM_DIR (empty: skip)
steps = 10  # interleaved timed steps per contender
ours_fp32 = "true"  # true: also ours in fp32 (--dtype=float32 of base_train), when bf16 is what it would choose
compare_dir = ""  # another checkout of this repository (e.g. before a change), timed like ours (empty: skip)
keep_freed_memory = "true"  # true: malloc keeps freed memory (our CPU setting), for all; false: glibc's default
depth = 4  # the model of dev/bench_cpu.sh: width 64 * depth, heads 128 wide
seq_len = 512
batch_size = 8
vocab_size = 8192

import os
import random
import resource
import statistics
import time

import torch

from dev.reference import load_checkout, load_reference
from nanochat import hardware
from nanochat.configurator import configure

configure(globals(), __file__)
ref_dir = ref_dir or os.environ.get("REF_DIR", "")
upstream_dir = upstream_dir or os.environ.get("UPSTREAM_DIR", "")
torch.manual_seed(0)
n_embd = 64 * depth


def build(gpt_module, **extra):
    torch.manual_seed(42)
    config = gpt_module.GPTConfig(sequence_len=seq_len, vocab_size=vocab_size, n_layer=depth, n_head=n_embd // 128,
                                  n_kv_head=n_embd // 128, n_embd=n_embd, **extra)
    with torch.device("meta"):
        model = gpt_module.GPT(config)
    model.to_empty(device="cpu")
    model.init_weights()
    return model


def make_step(model, optimizers, bf16_autocast, clip):
    compiled = torch.compile(model, dynamic=False)

    def step(x, y):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16_autocast):
            loss = compiled(x, y)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
    return step


contenders = {}  # name -> step function
(ref_gpt,) = load_reference(ref_dir, "gpt")
ref_model = build(ref_gpt)
contenders["reference (fp32)"] = make_step(ref_model, ref_model.setup_optimizers(), False, clip=True)

from nanochat import gpt as our_gpt
our_bf16 = hardware.choose_autocast_dtype("cpu") == torch.bfloat16
our_model = build(our_gpt)
contenders[f"ours ({'bf16' if our_bf16 else 'fp32'})"] = make_step(our_model, our_model.setup_optimizers(), our_bf16,
                                                                      clip=True)
if our_bf16 and ours_fp32 == "true":
    our_fp32_model = build(our_gpt)
    contenders["ours (fp32)"] = make_step(our_fp32_model, our_fp32_model.setup_optimizers(), False, clip=True)
if compare_dir:
    (cmp_gpt,) = load_checkout(compare_dir, "cmp_", ("hardware", "common", "collectives", "muon", "adamw", "loss"),
                                ("gpt",))
    cmp_model = build(cmp_gpt)
    contenders[f"ours @ {os.path.basename(os.path.abspath(compare_dir))}"] = make_step(
        cmp_model, cmp_model.setup_optimizers(), our_bf16, clip=True)
if upstream_dir:
    if not os.path.isfile(os.path.join(upstream_dir, "nanochat", "optim.py")):
        raise SystemExit(f"upstream_dir={upstream_dir!r} has no nanochat/optim.py: pass a checkout of upstream "
                         "nanochat (git clone https://github.com/karpathy/nanochat; e.g. master of July 2026)")
    os.environ["NANOCHAT_DTYPE"] = "bfloat16"  # read when its common module loads
    (up_gpt,) = load_checkout(upstream_dir, "up_", ("common", "optim", "flash_attention"), ("gpt",))
    up_model = build(up_gpt)
    contenders["upstream (bf16)"] = make_step(up_model, [up_model.setup_optimizer()], False, clip=False)

if keep_freed_memory == "true":
    hardware.keep_freed_memory()
g = torch.Generator().manual_seed(0)
batches = [(torch.randint(0, vocab_size, (batch_size, seq_len), generator=g),
            torch.randint(0, vocab_size, (batch_size, seq_len), generator=g)) for _ in range(4)]
print(f"CPU: {hardware.cpu_description()}, {torch.get_num_threads()} threads; depth {depth}, "
      f"{batch_size} x {seq_len} tokens, vocab {vocab_size}")
for name, step in contenders.items():  # compile and warm up
    t0 = time.perf_counter()
    for i in range(2):
        step(*batches[i])
    print(f"{name}: compile + 2 warm-up steps {time.perf_counter() - t0:.1f}s", flush=True)

times = {name: [] for name in contenders}
page_faults = {name: 0 for name in contenders}
order = random.Random(0)
for i in range(steps):
    for name in order.sample(list(contenders), len(contenders)):
        step = contenders[name]
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        step(*batches[i % len(batches)])
        times[name].append(time.perf_counter() - t0)
        page_faults[name] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults

tokens = batch_size * seq_len
ref_name = next(iter(contenders))
peak = hardware.peak_flops(torch.device("cpu"), torch.bfloat16)
flops_per_token = our_model.estimate_flops()
print(f"\n{'contender':22} {'step ms':>8} {'tok/s':>8} {'vs ref':>7} {'MFU bf16':>9} {'faults':>7}  "
      f"paired per-step ratios vs reference")
for name in contenders:
    median = statistics.median(times[name])
    paired = sorted(round(r / t, 2) for r, t in zip(times[ref_name], times[name]))
    ratio = statistics.median(times[ref_name]) / median
    mfu = flops_per_token * tokens / median / peak  # the same model FLOPs for all (ours and the reference's)
    print(f"{name:22} {median * 1000:8.0f} {tokens / median:8,.0f} {ratio:6.2f}x {mfu:8.1%} "
          f"{page_faults[name] / steps:7,.0f}  "
          f"{paired if name != ref_name else ''}")
print(f"(MFU against the measured bf16 matmul peak, {peak / 1e9:.0f} GFLOP/s; upstream's model has other FLOPs; "
      f"faults: page faults per step; malloc keeps freed memory: {keep_freed_memory})")
