"""
Decode speed of the Engine: tokens/s per batch size and time to first token for a long prompt, for our
Engine in fp32 and in the dtype decode.choose_decode_dtype picks, against the reference nanochat's
Engine (karpathy/nanochat at f37d45c) on the same weights, all timed in one process, alternating, so
that load from other processes hits every contender alike.

    python -m dev.bench_engine --ref_dir=/path/to/reference/nanochat   # or REF_DIR=... in the environment
    python -m dev.bench_engine --model_tag=d8 --batch_sizes=1,8 --max_tokens=256
    python -m dev.bench_engine --device_type=cuda                        # ours only (fp32, bf16 with CUDA graphs)
    python -m dev.bench_engine --modes=eager,compile                     # also time the compiled decode step
    python -m dev.bench_engine --compare_dir=/path/to/ours/before       # ours before a change, as a contender

The model is a base checkpoint from $NANOCHAT_BASE_DIR (the largest, or --model_tag), or a random one
of --depth when there is none (or with --model_tag=random). Without a reference, ratios are against our
fp32 Engine and greedy tokens are checked against the model's naive full-forward generate instead.
Every row reports whether its tokens equal the baseline's; bf16 rows are not expected to, nor sampled batches
against the reference (it gives every row one first token, ours draw one each). Two workloads:
greedy, and sampling as a chat samples (temperature 1, top-k 50: the sampler is part of each step).
"""

import glob
import os
import statistics
import time

import torch

from dev.bench_model import NoTokenizer, random_gpt
from dev.reference import load_checkout, load_reference, reference_model
from nanochat import hardware
from nanochat.common import autodetect_device_type, get_base_dir
from nanochat.configurator import configure
from nanochat.decode import bf16_decode_speedup, choose_decode_dtype
from nanochat.engine import Engine

# -----------------------------------------------------------------------------
# Settings (--name=value on the command line; --help prints this block)

# Model
model_tag = ""  # checkpoint folder under base_checkpoints ("" = the largest; "random" = random weights of `depth`)
step = -1  # checkpoint step (-1 = the last one saved)
depth = 4  # depth of the random model when there is no checkpoint (width 64 * depth, heads of 128, vocab 8192)
# What to time
batch_sizes = "1,8"  # samples decoded together, comma separated
max_tokens = 128  # new tokens per sample in the throughput runs
prompt_len = 16  # prompt tokens in the throughput runs
ttft_prompt_len = 500  # prompt tokens of the time-to-first-token runs (0 = skip them)
repeats = 5  # timed rounds, every contender once per round in turn (tok/s: its fastest; ratio: median of rounds)
dtypes = "float32,auto"  # our Engine's decode dtypes: float32, bfloat16, auto (= decode.choose_decode_dtype)
modes = ""  # our decode modes, comma separated: eager, compile, cuda_graph ("" = the Engine's default)
workloads = "greedy,sample"  # greedy (temperature 0) and/or sample (temperature 1, top-k 50)
compare_dir = ""  # another checkout of this repository (e.g. before a change), its Engine timed too (empty: skip)
ref_dir = os.environ.get("REF_DIR", "")  # a checkout of the reference nanochat (f37d45c) to time as baseline
# Runtime
device_type = ""  # cuda|cpu|mps (empty = autodetect)
threads = 0  # torch CPU threads (0 = torch's default)
seed = 0  # random model and prompts
configure(globals(), __file__)
# -----------------------------------------------------------------------------


def load_our_model(device):
    checkpoints = os.path.join(get_base_dir(), "base_checkpoints")
    if model_tag != "random" and glob.glob(os.path.join(checkpoints, "*", "model_*.pt")):
        from nanochat.checkpoint_manager import load_model
        model, _, meta = load_model("base", device, phase="eval", model_tag=model_tag or None,
                                    step=None if step < 0 else step)
        return model, f"checkpoint {meta.get('model_tag', model_tag) or ''} step {meta['step']}".strip()
    model = random_gpt(depth, seed=seed, device=device)
    return model, f"random weights (no checkpoint in {checkpoints})"


def main():
    if threads > 0:
        torch.set_num_threads(threads)
    device = torch.device(device_type or autodetect_device_type())
    model, source = load_our_model(device)
    config = model.config
    vocab = config.vocab_size
    generator = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, vocab, (prompt_len,), generator=generator).tolist()
    long_prompt = torch.randint(0, vocab, (ttft_prompt_len,), generator=generator).tolist()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    # Contenders: name -> generate(tokens, num_samples, max_tokens) yielding columns
    contenders = {}
    fp32_contenders = []  # ours in fp32: greedy tokens comparable with the naive full forward
    if ref_dir:
        ref_gpt, ref_engine = load_reference(ref_dir, "gpt", "engine")
        ref = ref_engine.Engine(reference_model(ref_gpt, model), NoTokenizer())
        ref_bf16 = device.type == "cuda"  # the reference decodes under bf16 autocast on CUDA, in fp32 elsewhere

        def run_reference(tokens, n, num_tokens, **sampling):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=ref_bf16):
                yield from ref.generate(tokens, num_samples=n, max_tokens=num_tokens, **sampling)

        contenders["reference" + (" (bf16 autocast)" if ref_bf16 else " (fp32)")] = run_reference
    engines = {"ours": (Engine, model)}
    if compare_dir:
        cmp_gpt, cmp_engine = load_checkout(compare_dir, "cmp_", ("hardware", "common", "calculator", "collectives",
                                                                  "muon", "adamw", "loss", "sampling", "gpt", "decode"),
                                          ("gpt", "engine"))
        engines[f"@{os.path.basename(os.path.abspath(compare_dir))}"] = (cmp_engine.Engine, reference_model(cmp_gpt, model))
    for dtype_name in dtypes.split(","):
        for mode in (modes.split(",") if modes else [None]):
            dtype = choose_decode_dtype(device, mode) if dtype_name == "auto" else getattr(torch, dtype_name)
            for label, (engine_class, engine_model) in engines.items():
                engine = engine_class(engine_model, NoTokenizer(), dtype=dtype, decode_mode=mode)
                name = (f"{label} {str(dtype)[6:]}" + (" (auto)" if dtype_name == "auto" else "")
                        + (f" {mode}" if mode else ""))
                contenders[name] = lambda tokens, n, num_tokens, engine=engine, **sampling: engine.generate(
                    tokens, num_samples=n, max_tokens=num_tokens, **sampling)
                if dtype == torch.float32:
                    fp32_contenders.append(name)
    baseline = next(iter(contenders))

    print(f"Model: {source}, depth {config.n_layer}, width {config.n_embd}, vocab {vocab}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params")
    print(f"Device: {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else
          f", CPU {hardware.cpu_description()}, torch threads {torch.get_num_threads()}"))
    print(f"bf16/fp32 decode matmul speed (decode.bf16_decode_speedup): {bf16_decode_speedup(device):.2f}x; "
          f"load average {os.getloadavg()[0]:.1f}; {repeats} alternating rounds; baseline: {baseline}")

    def timed(name, tokens, n, num_tokens, first_only=False, **sampling):
        sync()
        t0 = time.perf_counter()
        columns = []
        for column, _ in contenders[name](tokens, n, num_tokens, **sampling):
            columns.append(column)
            if first_only:
                break
        sync()
        return time.perf_counter() - t0, columns

    def race(tokens, n, num_tokens, first_only=False, **sampling):
        """Per contender: best time, its tokens, and the median over rounds of its tokens/s over the baseline's in the
        same round (contenders alternate round after round, so a burst of load hits a round's contenders alike)."""
        best, ratios = {}, {name: [] for name in contenders}
        for round_ in range(repeats + 1):  # round 0 warms up (and compiles or captures)
            times, rates = {}, {}
            for name in contenders:
                times[name], columns = timed(name, tokens, n, num_tokens, first_only, **sampling)
                if len(columns) != (1 if first_only else num_tokens):
                    raise RuntimeError(f"{name} decoded {len(columns)} tokens per row, not {num_tokens}")
                rates[name] = len(columns) / times[name]
                if round_ == 0:
                    warmup[name] = max(warmup.get(name, 0.0), times[name])
                elif name not in best or times[name] < best[name][0]:
                    best[name] = (times[name], columns)
            for name in contenders if round_ > 0 else ():
                ratios[name].append(rates[name] / rates[baseline])
        return {name: (seconds, columns, statistics.median(ratios[name])) for name, (seconds, columns) in best.items()}

    warmup = {}
    for workload in workloads.split(","):
        sampling = {"greedy": dict(temperature=0.0), "sample": dict(temperature=1.0, top_k=50)}[workload]
        print(f"\nThroughput: prompt {prompt_len} tokens, {max_tokens} new tokens per sample, {workload} {sampling}")
        print(f"{'contender':<30} {'batch':>5} {'tok/s':>9} {'vs baseline':>11}  same tokens as baseline")
        for n in [int(b) for b in batch_sizes.split(",") if b.strip()]:
            best = race(prompt, n, max_tokens, **sampling)
            base_columns = best[baseline][1]
            same_as = None
            if baseline in fp32_contenders and n == 1 and workload == "greedy":  # no reference: the naive generate
                naive = list(model.generate(prompt, max_tokens=min(max_tokens, 32), temperature=0.0))
                same_as = [c[0] for c in base_columns[:len(naive)]] == naive
            for name, (seconds, columns, ratio) in best.items():
                same = columns == base_columns
                if ref_dir and n > 1 and workload == "sample" and not name.startswith("reference"):
                    # the reference draws one first token for all rows (its TODO), ours one per row (engine.py):
                    # from the second draw on, the two use different random numbers
                    same = f"{same} (first draw: one per row here, one for all rows in the reference)"
                if name == baseline:
                    same = "(itself" + (f"; naive full forward: {same_as})" if same_as is not None else ")")
                print(f"{name:<30} {n:>5} {n * len(columns) / seconds:>9.0f} {ratio:>10.2f}x  {same}")

    if ttft_prompt_len > 0:
        print(f"\nTime to first token: prompt {ttft_prompt_len} tokens, batch 1 (the prefill forward, then one sample)")
        best = race(long_prompt, 1, 1, first_only=True, temperature=0.0)
        for name, (seconds, _, ratio) in best.items():
            print(f"{name:<30} {seconds * 1000:>8.1f} ms {ratio:>10.2f}x")
    print("\nFirst call (warm-up, includes any compilation or graph capture): "
          + ", ".join(f"{name} {seconds:.1f}s" for name, seconds in warmup.items()))


if __name__ == "__main__":
    main()
