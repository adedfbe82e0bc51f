"""
Where the time of one decoded token goes: torch.profiler over generations of the Engine, as a chat samples
(temperature 1, top-k 50), in the mode and dtype a chat session gets (decode.session_mode,
decode.choose_decode_dtype). Prints, per batch size, the unprofiled tokens/s and the profiled time per step
split into the model's step (matmul / attention / other kernels / the compiled code's Python and dispatch
overhead), the sampler, and the Engine's own loop, with the largest ops besides the matmuls.

    python -m dev.profile_decode                         # depth 4, vocab 8192, batch 1 and 8, CPU
    python -m dev.profile_decode --mode=eager --dtype=float32
    python -m dev.profile_decode --workload=greedy --top=30

Categories, by self time of the profiled ops: matmul = the compiled step's GEMM kernels and the mm/linear ops;
attention = the fused kernel holding the attention's softmax, or the eager SDPA op; kernels = the step's other
ops; step overhead = torch.compile's own ranges (dynamo's guards, the generated code's Python wrapper) and
the step's wall time outside any op; sampling = the sampler (sampling.Sampler: its ops and its Python, and in a
compiled CPU step the top-k and the kernels that pick: decode.run_step_and_pick, run_step_and_argmax); engine
loop = the rest (the rows' bookkeeping, the next ids, and the prompt's prefill spread over the steps).
The profiler adds a few microseconds per op: the profiled step is slower than the unprofiled tokens/s says.
"""

# Model: a random one of the speedrun's shapes
depth = 4  # n_layer; width 64 * depth, heads of 128
vocab_size = 8192  # vocabulary size
# Work
batch_sizes = "1,8"  # samples decoded together, comma separated
prompt_len = 16  # prompt tokens
max_tokens = 256  # new tokens per sample
workload = "sample"  # sample (temperature 1, top-k 50, as a chat) | greedy
mode = "auto"  # auto (= decode.session_mode: what a chat session gets) | eager | compile | cuda_graph
dtype = "auto"  # auto (= decode.choose_decode_dtype for the mode) | bfloat16 | float32
repeats = 3  # unprofiled generations timed (the fastest counts); one more is profiled
# Runtime
threads = 0  # torch threads (0 = PyTorch's default)
top = 12  # how many non-matmul ops to list
device_type = "cpu"  # cpu|cuda

import re
import time
from collections import defaultdict

from dev.profile_step import ATTENTION_OPS, MATMUL_OPS, start_profiling

PHASE = "decode phase: "  # the profiler ranges this script adds (the compiled code has its own "## ..." ones)


def category(name):
    if name == "aten::topk" or "argmax" in name:  # the sampler's ops inside a compiled step (named after their ops)
        return "sampling"
    # inductor's GEMM template kernels are graph_<n>_gemm_<shape>_kernel, or (torch 2.11) graph_<n>_kernel
    if ("gemm" in name or re.fullmatch(r"graph_\d+_kernel", name) or name == "nanochat::prepacked_linear"
            or name.startswith(MATMUL_OPS)):
        return "matmul"
    if any(op in name for op in ATTENTION_OPS):  # the compiled step's attention: the kernel with its softmax
        return "attention"
    if not name.startswith(("aten::", "graph_", "mkldnn::", "nanochat::")):  # torch.compile's own ranges
        return "step overhead"
    return "kernels"


def main():
    from nanochat.configurator import configure
    configure(globals(), __file__)

    import torch
    from torch.profiler import profile, record_function, ProfilerActivity
    from dev.bench_model import NoTokenizer, random_gpt
    from nanochat import decode, engine, hardware
    from nanochat.sampling import Sampler

    device = start_profiling(threads, device_type)
    decode_mode = decode.session_mode(device) if mode == "auto" else mode
    decode_dtype = decode.choose_decode_dtype(device, decode_mode) if dtype == "auto" else getattr(torch, dtype)
    model = random_gpt(depth, vocab_size, device=device)
    chat_engine = engine.Engine(model, NoTokenizer(), dtype=decode_dtype, decode_mode=decode_mode)
    sampling = dict(temperature=1.0, top_k=50) if workload == "sample" else dict(temperature=0.0)
    prompt = torch.randint(0, vocab_size, (prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    print(f"depth {depth}, vocab {vocab_size}, {workload} {sampling}, mode {decode_mode or 'default'}, "
          f"{str(decode_dtype)[6:]}, {torch.get_num_threads()} threads; CPU {hardware.cpu_description()}")

    # The phases as ranges in the profile: the Decoder's step function and the sampler's methods, wrapped
    start = decode.Decoder.start
    sampler_methods = {name: getattr(Sampler, name) for name in ("__call__", "step_inputs")}

    def start_in_range(self, *args):
        step = start(self, *args)

        def step_in_range(ids):
            with record_function(PHASE + "step"):
                next_ids = step(ids)
                sync()
                return next_ids
        return step_in_range

    def in_sampling_range(method):
        def method_in_range(*args, **kwargs):
            with record_function(PHASE + "sampling"):
                return method(*args, **kwargs)
        return method_in_range

    decode.Decoder.start = start_in_range
    for name, method in sampler_methods.items():
        setattr(Sampler, name, in_sampling_range(method))

    def generate(batch_size):
        sync()
        t0 = time.perf_counter()
        steps = sum(1 for _ in chat_engine.generate(prompt, num_samples=batch_size, max_tokens=max_tokens, **sampling))
        sync()
        return time.perf_counter() - t0, steps

    for batch_size in [int(b) for b in batch_sizes.split(",")]:
        t0 = time.perf_counter()
        generate(batch_size)  # compiles or captures
        warmup = time.perf_counter() - t0
        seconds = min(generate(batch_size)[0] for _ in range(repeats))
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            wall, steps = generate(batch_size)

        def phase_of(event):
            while event is not None and not event.name.startswith(PHASE):
                event = event.cpu_parent
            return event.name[len(PHASE):] if event is not None else None

        ranges, totals, by_op = defaultdict(float), defaultdict(float), defaultdict(float)
        for event in prof.events():
            if event.name.startswith(PHASE):
                in_step = event.name == PHASE + "sampling" and phase_of(event.cpu_parent) == "step"
                ranges[event.name[len(PHASE):] + (" in step" if in_step else "")] += event.cpu_time_total / 1000
                continue
            phase = phase_of(event) if event.self_cpu_time_total > 0 else None
            if phase is None:
                continue
            kind = category(event.name) if phase == "step" else phase
            in_compiled_step = phase == "step" and kind == "sampling"  # a compiled step's own sampler ops
            totals["picked in step" if in_compiled_step else kind] += event.self_cpu_time_total / 1000
            if kind != "matmul":
                by_op[(kind, event.name)] += event.self_cpu_time_total / 1000
        in_step_ops = sum(totals[k] for k in ("matmul", "attention", "kernels", "step overhead"))
        picked = totals["picked in step"]
        totals["step overhead"] += ranges["step"] - in_step_ops - picked - ranges["sampling in step"]
        totals["sampling"] = ranges["sampling"] + ranges["sampling in step"] + picked  # its ops and its Python
        totals["engine loop"] = wall * 1000 - ranges["step"] - ranges["sampling"]

        print(f"\nbatch {batch_size}: {batch_size * steps / seconds:,.0f} tok/s unprofiled ({seconds / steps * 1000:.3f} "
              f"ms per step; first generation {warmup:.1f} s); profiled {wall / steps * 1000:.3f} ms per step:")
        for kind in ("matmul", "attention", "kernels", "step overhead", "sampling", "engine loop"):
            ms = totals[kind] / steps
            print(f"  {kind:14s} {ms * 1000:8.1f} us  {100 * ms / (wall * 1000 / steps):5.1f}%")
        print(f"  largest ops besides matmuls (us per step, self time):")
        for (kind, name), ms in sorted(by_op.items(), key=lambda kv: -kv[1])[:top]:
            print(f"  {ms / steps * 1000:8.1f}  {kind:10s} {name[:100]}")
    decode.Decoder.start = start
    for name, method in sampler_methods.items():
        setattr(Sampler, name, method)


if __name__ == "__main__":
    main()
