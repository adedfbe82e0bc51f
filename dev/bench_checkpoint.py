"""
What the checkpoint checksums cost: save and load of a depth-20-sized model state_dict (fp32, ~2.2 GB)
on CPU, with records (size + CRC-32 while writing, verified before loading) and without (plain
atomic torch.save / torch.load), alternating so that machine load affects both alike.

    python -m dev.bench_checkpoint [--depth=20] [--rounds=2] [--dir=/tmp]
"""

import argparse
import os
import shutil
import tempfile
import time

import torch

from nanochat.common import atomic_write
from nanochat.gpt import GPTConfig, GPT
from nanochat.integrity import file_record, verify_file, write_recorded


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--depth", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--dir", default=tempfile.gettempdir())
    args = parser.parse_args()
    dim = 64 * args.depth
    config = GPTConfig(sequence_len=2048, vocab_size=65536, n_layer=args.depth, n_head=-(-dim // 128),
                       n_kv_head=-(-dim // 128), n_embd=dim)
    with torch.device("meta"):
        model = GPT(config)
    state = {k: torch.randn(v.shape) for k, v in model.state_dict().items()}  # random: no compressible zeros
    nbytes = sum(v.numel() * v.element_size() for v in state.values())
    folder = tempfile.mkdtemp(dir=args.dir, prefix="bench_checkpoint.")
    path = os.path.join(folder, "model.pt")
    times = {"save": [], "save+record": [], "load": [], "verify+load": []}
    try:
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            atomic_write(path, lambda f: torch.save(state, f))
            times["save"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            torch.load(path, weights_only=True)
            times["load"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            record = write_recorded(path, lambda f: torch.save(state, f))
            times["save+record"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            verify_file(path, record, "")
            torch.load(path, weights_only=True)
            times["verify+load"].append(time.perf_counter() - t0)
        t0 = time.perf_counter(); file_record(path); crc_seconds = time.perf_counter() - t0
    finally:
        shutil.rmtree(folder)
    best = {k: min(v) for k, v in times.items()}
    print(f"depth {args.depth}: {nbytes / 1e9:.2f} GB of fp32 weights, best of {args.rounds} rounds (alternating)")
    print(f"  save  without records: {best['save']:.2f}s | with: {best['save+record']:.2f}s | "
          f"ratio {best['save+record'] / best['save']:.2f}")
    print(f"  load  without check:   {best['load']:.2f}s | with: {best['verify+load']:.2f}s | "
          f"ratio {best['verify+load'] / best['load']:.2f}")
    print(f"  CRC-32 of the file alone: {crc_seconds:.2f}s ({nbytes / crc_seconds / 1e9:.2f} GB/s)")


if __name__ == "__main__":
    main()
