"""
Peak memory of one forward+backward with targets: the chunked loss of nanochat.gpt ("ours") against
the plain path (the full logits, then F.cross_entropy) and, given a checkout, the reference nanochat's
model. Each variant runs in a fresh subprocess; the peak is measured over a second forward+backward
(the first one compiles and warms up), relative to the memory held just before it (model, inputs).
On CUDA: torch.cuda.max_memory_allocated. Elsewhere: the process's resident set, sampled every 1 ms.

    python -m dev.loss_memory                                   # CPU: depth 4, 8 x 512 tokens, vocab 65536, fp32
    python -m dev.loss_memory --ref_dir=/path/to/nanochat-f37d45c   # also the reference (karpathy/nanochat f37d45c)
    python -m dev.loss_memory --device_type=cuda --depth=20 --batch_size=32 --seq_len=2048 --dtype=bfloat16 --compile=true
"""

# Model and batch: the shapes that get measured
depth = 4  # n_layer; width is 64 * depth and heads are 128 wide, as in base_train
seq_len = 512  # tokens per sequence
batch_size = 8  # sequences per forward pass
vocab_size = 65536  # the speedrun's vocabulary
# Run: where and how
device_type = "cpu"  # cpu|cuda|mps
dtype = "float32"  # float32|bfloat16 (bf16 autocast, as training on GPUs)
compile = "false"  # true = torch.compile the model (the measured pass is then the second, compiled one)
variants = "ours,plain"  # which of ours|plain|reference to measure, comma-separated
ref_dir = ""  # a checkout of the reference nanochat (karpathy/nanochat at f37d45c), for the 'reference' variant

import json
import os
import subprocess
import sys
import threading
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def measure(spec):
    """Runs in the subprocess: build the model, one warm-up pass, then the measured pass. Returns a dict."""
    import torch
    import torch.nn.functional as F
    from nanochat.gpt import GPT, GPTConfig  # ours or the reference's, whichever is first on sys.path

    device = torch.device(spec["device_type"])
    n_embd = 64 * spec["depth"]
    n_head = max(1, -(-n_embd // 128))
    config = GPTConfig(sequence_len=spec["seq_len"], vocab_size=spec["vocab_size"], n_layer=spec["depth"],
                       n_head=n_head, n_kv_head=n_head, n_embd=n_embd)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    net = torch.compile(model, dynamic=False) if spec["compile"] else model
    inputs = torch.randint(0, config.vocab_size, (spec["batch_size"], spec["seq_len"]), device=device)
    targets = torch.randint(0, config.vocab_size, (spec["batch_size"], spec["seq_len"]), device=device)
    use_bf16 = spec["dtype"] == "bfloat16"

    def forward_backward():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            if spec["variant"] == "plain":  # the loss as the reference computes it: all the logits at once
                logits = net(inputs)
                loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.view(-1), ignore_index=-1)
            else:
                loss = net(inputs, targets)
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss.item()

    forward_backward()  # compiles, warms up
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        loss = forward_backward()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() - before
        return {"peak_bytes": peak, "loss": loss, "seconds": seconds, "device": torch.cuda.get_device_name()}
    import psutil
    process = psutil.Process()
    before = process.memory_info().rss
    peak = before
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, process.memory_info().rss)
            time.sleep(0.001)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    loss = forward_backward()
    seconds = time.perf_counter() - t0
    done.set()
    sampler.join()
    return {"peak_bytes": peak - before, "loss": loss, "seconds": seconds, "device": spec["device_type"]}


def main():
    from nanochat.configurator import configure
    configure(globals(), __file__)
    names = [v.strip() for v in variants.split(",") if v.strip()]
    unknown = set(names) - {"ours", "plain", "reference"}
    if unknown:
        raise SystemExit(f"error: unknown variants {sorted(unknown)}; choose from ours, plain, reference")
    if "reference" in names and not (ref_dir and os.path.isfile(os.path.join(ref_dir, "nanochat", "gpt.py"))):
        raise SystemExit("error: the 'reference' variant needs --ref_dir=PATH, a checkout of the reference nanochat: "
                         "git clone https://github.com/karpathy/nanochat && git -C nanochat checkout f37d45c "
                         f"(got {ref_dir!r}, which has no nanochat/gpt.py)")
    spec = dict(depth=depth, seq_len=seq_len, batch_size=batch_size, vocab_size=vocab_size, device_type=device_type,
                dtype=dtype, compile=compile == "true")
    tokens = batch_size * seq_len
    logits_gb = tokens * vocab_size * 4 / 1e9
    print(f"depth {depth}, {batch_size} x {seq_len} tokens, vocab {vocab_size:,}, {dtype}, compile {compile}, {device_type}; "
          f"one fp32 (tokens x vocab) tensor is {logits_gb:.2f} GB")
    results = {}
    for name in names:
        # this file measures, in a fresh process whose `nanochat` package is ours or the reference's
        root = os.path.abspath(ref_dir) if name == "reference" else REPO_ROOT
        run = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(dict(spec, variant=name))],
                             capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=root), cwd=root)
        line = next((l for l in run.stdout.splitlines() if l.startswith("RESULT ")), None)
        if run.returncode != 0 or line is None:
            print(run.stdout[-2000:], run.stderr[-4000:], file=sys.stderr)
            raise SystemExit(f"error: the {name} variant failed (exit code {run.returncode})")
        results[name] = json.loads(line.removeprefix("RESULT "))
        r = results[name]
        print(f"{name:10s} peak {r['peak_bytes'] / 1e9:7.3f} GB above the model ({r['peak_bytes'] / 2**20:9.1f} MiB) | "
              f"loss {r['loss']:.4f} | {r['seconds']:.2f} s | {r['device']}", flush=True)
    for base in ("plain", "reference"):
        if "ours" in results and base in results:
            ratio = results["ours"]["peak_bytes"] / results[base]["peak_bytes"]
            saved = results[base]["peak_bytes"] - results["ours"]["peak_bytes"]
            print(f"ours / {base}: {ratio:.3f} of the peak; {saved / 1e9:.2f} GB less "
                  f"({saved / (tokens * vocab_size):.2f} bytes per logit)")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        print("RESULT", json.dumps(measure(json.loads(sys.argv[2]))))
    else:
        main()
