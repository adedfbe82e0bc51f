"""
Decode speed of the Engine (KV cache) against the model's naive generate (full forward per token),
measured in the same process on a random-init model, for several generation lengths.

    python -m dev.bench_engine
    python -m dev.bench_engine --lengths=64,128,256,512 --repeats=1

The naive generator recomputes the whole prefix for every token (O(T^2) per sequence), the Engine
only the new token (O(T)), so the speedup should grow with the number of new tokens.
Both run greedy in fp32 and must produce the same tokens; the script checks that too.
"""

import math
import time

# Model: depth 4 as in `base_train --depth=4` (width 64 * depth, 128-wide heads)
depth = 4  # number of Transformer blocks
n_embd = 256  # model width
n_head = 2  # attention heads (head_dim = n_embd / n_head)
vocab_size = 8192  # vocabulary size of the small tokenizer
sequence_len = 1024  # context length (rotary tables cover 10x this)
# Benchmark
lengths = "64,128,256"  # numbers of new tokens to generate, comma separated
prompt_len = 16  # prompt tokens before generation
repeats = 3  # timed runs per measurement, alternating naive and engine; the fastest of each counts
seed = 0  # model init and prompt
# Runtime
device_type = "cpu"  # cpu|cuda|mps
threads = 0  # torch CPU threads (0 = torch's default)


class _NoTokenizer:
    """The Engine needs special-token ids for tool use and stopping; ids outside the vocab never occur."""

    def encode_special(self, name):
        return -1

    def get_bos_token_id(self):
        return -1


def main():
    from nanochat.configurator import configure
    configure(globals(), __file__)

    import torch
    from nanochat.engine import Engine
    from nanochat.gpt import GPTConfig, build_gpt

    if threads > 0:
        torch.set_num_threads(threads)
    device = torch.device(device_type)
    new_token_counts = [int(x) for x in lengths.split(",") if x.strip()]

    torch.manual_seed(seed)
    config = GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=depth,
                       n_head=n_head, n_kv_head=n_head, n_embd=n_embd)
    model = build_gpt(config, device)
    with torch.no_grad():
        # init_weights zeroes lm_head and the output projections; randomise them so the logits
        # depend on the context and the token-equality check below means something
        for p in model.parameters():
            if p.dim() == 2 and not p.any():
                p.normal_(0.0, 1.0 / math.sqrt(p.size(1)))
            p.data = p.data.float()
    model.eval()
    engine = Engine(model, _NoTokenizer())
    prompt = torch.randint(0, vocab_size, (prompt_len,), generator=torch.Generator().manual_seed(seed)).tolist()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def naive(n):
        return list(model.generate(prompt, max_tokens=n, temperature=0.0))

    def cached(n):
        return [column[0] for column, _ in engine.generate(prompt, num_samples=1, max_tokens=n, temperature=0.0)]

    def timed(fn, n):
        sync()
        t0 = time.perf_counter()
        out = fn(n)
        sync()
        return time.perf_counter() - t0, out

    n_params = sum(p.numel() for p in model.parameters())
    print(f"Model: depth {depth}, n_embd {n_embd}, n_head {n_head}, vocab {vocab_size}, "
          f"{n_params / 1e6:.2f}M params, fp32")
    print(f"Device: {device}, torch threads: {torch.get_num_threads()}, prompt {prompt_len} tokens, best of {repeats}")
    naive(8), cached(8)  # warm-up: first-call allocations and kernel selection
    print(f"{'new tokens':>10} | {'naive tok/s':>11} | {'engine tok/s':>12} | {'speedup':>7} | same tokens")
    for n in new_token_counts:
        # alternate the two so that a burst of load from other processes hits both alike
        naive_runs, engine_runs = [], []
        for _ in range(repeats):
            naive_runs.append(timed(naive, n))
            engine_runs.append(timed(cached, n))
        (t_naive, out_naive), (t_engine, out_engine) = min(naive_runs), min(engine_runs)
        same = out_naive == out_engine
        print(f"{n:>10} | {n / t_naive:>11.1f} | {n / t_engine:>12.1f} | {t_naive / t_engine:>6.2f}x | {same}")


if __name__ == "__main__":
    main()
