"""
The Hugging Face format, measured: export and import time and folder size per model depth, the largest
logit difference between transformers' NanoChatForCausalLM and our GPT, whether the converted tokenizer
gives our ids on every document of a corpus, and the tokens/s of the same greedy generation in
transformers and in our Engine on CPU, alternating in one process so that load from other processes
hits both alike.

    python -m dev.bench_hf                                  # depths 4 and 20, the shared corpus
    python -m dev.bench_hf --depths=4 --gen_tokens=128 --repeats=3

Models have random weights (every matrix at the init's scale) and the speedrun's shapes: width 64 x depth,
heads of 128, vocab 65536, context 2048. The tokenizer is trained on the corpus first (about 10 s for the
shared one); with --corpus_dir= it is trained on generated words instead (a toy run).
"""

import glob
import os
import random
import shutil
import statistics
import tempfile
import time

import torch

from dev.bench_model import random_gpt
from nanochat import hardware
from nanochat.checkpoint_manager import load_checkpoint, save_checkpoint
from nanochat.configurator import configure
from nanochat.engine import Engine
from nanochat.hf_format import import_folder, require_hf, write_folder
from nanochat.tokenizer import RustBPETokenizer

# -----------------------------------------------------------------------------
# Settings (--name=value on the command line; --help prints this block)

# Models
depths = "4,20"  # model depths to export and import, comma separated (width 64 x depth)
vocab_size = 65536  # the tokenizer's (and the models') vocabulary
sequence_len = 2048  # the models' training context
# Data
corpus_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data",
                          "corpus")  # parquet shards with a `text` column; the last is the validation split ("" = toy)
logit_tokens = 256  # tokens of each of the two validation documents the logits are compared on
# Generation
gen_depths = "4,20"  # depths whose greedy generation is timed in transformers and in our Engine
gen_tokens = 64  # new tokens per generation
prompt_tokens = 32  # prompt tokens (the start of a validation document)
repeats = 2  # timed rounds, transformers and ours alternating; tok/s is each one's fastest
# Runtime
threads = 0  # torch CPU threads (0 = torch's default)
seed = 0
configure(globals(), __file__)
# -----------------------------------------------------------------------------


def corpus_texts():
    """(training texts, validation texts): the corpus shards, or generated word salad without a corpus."""
    shards = sorted(glob.glob(os.path.join(corpus_dir, "*.parquet"))) if corpus_dir else []
    if len(shards) >= 2:
        import pyarrow.parquet as pq
        read = lambda paths: [t for p in paths for t in pq.read_table(p, columns=["text"]).column("text").to_pylist()]
        return read(shards[:-1]), read(shards[-1:])
    rng = random.Random(seed)
    extras = ["naïve", "café", "東京", "🙂", "2025", "3.14", "don't", "\n", "\t"]
    word = lambda: rng.choice(extras) if rng.random() < 0.1 else "".join(rng.choices("aeioukrtnmslpv", k=rng.randint(1, 7)))
    salad = [" ".join(word() for _ in range(200)) for _ in range(400)]
    return salad[:300], salad[300:]


def folder_size(path):
    return sum(os.path.getsize(os.path.join(path, name)) for name in os.listdir(path))


def main():
    require_hf()
    from transformers import AutoModelForCausalLM, AutoTokenizer
    if threads > 0:
        torch.set_num_threads(threads)
    print(f"CPU: {hardware.cpu_model()}, torch threads {torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.1f}")
    train_texts, val_texts = corpus_texts()
    t0 = time.perf_counter()
    tokenizer = RustBPETokenizer.train_from_iterator(iter(train_texts), vocab_size)
    print(f"Tokenizer: vocab {vocab_size:,} trained on {len(train_texts):,} documents in {time.perf_counter() - t0:.1f}s"
          f" ({'corpus ' + os.path.abspath(corpus_dir) if corpus_dir else 'generated words'})")
    work = tempfile.mkdtemp(prefix="bench_hf_")
    os.environ["NANOCHAT_BASE_DIR"] = os.path.join(work, "imported")  # import_folder writes here
    try:
        rows = []
        for depth in [int(d) for d in depths.split(",") if d.strip()]:
            rows.append(measure(depth, tokenizer, val_texts, work, AutoModelForCausalLM, AutoTokenizer))
            shutil.rmtree(os.path.join(work, "imported"), ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n{'depth':>5} {'params':>8} {'folder':>10} {'export':>8} {'import':>8} {'HF load':>8} {'round trip':>10} "
          f"{'max |dlogit|/max|logit|':>23} {'argmax same':>11} {'HF tok/s':>9} {'ours tok/s':>10} {'same tokens':>11}")
    for r in rows:
        gen = r.get("gen") or {}
        print(f"{r['depth']:>5} {r['params'] / 1e6:>7.0f}M {r['size'] / 2**20:>8.0f}MiB {r['export']:>7.1f}s "
              f"{r['import']:>7.1f}s {r['hf_load']:>7.1f}s {str(r['identical']):>10} {r['rel_diff']:>23.2e} "
              f"{r['argmax_same']:>10.1%} {gen.get('hf', float('nan')):>9.1f} {gen.get('ours', float('nan')):>10.1f} "
              f"{str(gen.get('same', '-')):>11}")


def measure(depth, tokenizer, val_texts, work, AutoModelForCausalLM, AutoTokenizer):
    print(f"\nDepth {depth}:")
    model = random_gpt(depth, vocab_size, sequence_len, seed)
    config = dict(vars(model.config))
    checkpoint_dir = os.path.join(work, "checkpoints", f"d{depth}")
    save_checkpoint(checkpoint_dir, 1, model.state_dict(), None, {"step": 1, "model_config": config})
    out_dir = os.path.join(work, f"export_d{depth}")

    # export: what scripts/export_hf.py does once the checkpoint is found
    t0 = time.perf_counter()
    model_data, _, meta = load_checkpoint(checkpoint_dir, 1, "cpu")
    write_folder(out_dir, model_data, meta["model_config"], tokenizer, {"phase": "base", "model_tag": f"d{depth}",
                                                                          "step": 1}, card=lambda n: "benchmark")
    export_s = time.perf_counter() - t0
    del model_data
    size = folder_size(out_dir)
    print(f"  export {export_s:.1f}s, {size / 2**20:,.0f} MiB: {', '.join(sorted(os.listdir(out_dir)))}")

    t0 = time.perf_counter()
    phase, tag, step = import_folder(out_dir)
    import_s = time.perf_counter() - t0
    imported, _, _ = load_checkpoint(os.path.join(os.environ["NANOCHAT_BASE_DIR"], "base_checkpoints", tag), step,
                                     "cpu")
    identical = all(torch.equal(imported[k], v) for k, v in model.state_dict().items())
    del imported
    print(f"  import {import_s:.1f}s, weights bit-identical: {identical}")

    t0 = time.perf_counter()
    hf = AutoModelForCausalLM.from_pretrained(out_dir).eval()
    hf_load_s = time.perf_counter() - t0
    if depth == int(depths.split(",")[0]):  # the tokenizer once: ids on every validation document
        hf_tokenizer = AutoTokenizer.from_pretrained(out_dir)
        t0 = time.perf_counter()
        theirs = hf_tokenizer(val_texts, add_special_tokens=False)["input_ids"]
        hf_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        ours = tokenizer.encode(val_texts)
        ours_s = time.perf_counter() - t0
        same = sum(a == b for a, b in zip(ours, theirs))
        print(f"  tokenizer: HF ids equal ours on {same} of {len(val_texts)} validation documents "
              f"({sum(map(len, ours)):,} tokens; HF {hf_s:.2f}s, ours {ours_s:.2f}s)")

    rows = tokenizer.encode(val_texts[:2], prepend="<|bos|>")
    length = min(logit_tokens, *map(len, rows))
    ids = torch.tensor([row[:length] for row in rows])  # (2, length)
    with torch.no_grad():
        ours_logits, hf_logits = model(ids), hf(ids).logits
    rel_diff = ((ours_logits - hf_logits).abs().max() / ours_logits.abs().max()).item()
    argmax_same = (ours_logits.argmax(-1) == hf_logits.argmax(-1)).float().mean().item()
    print(f"  logits on {tuple(ids.shape)} tokens: max |difference| / max |logit| = {rel_diff:.2e}, "
          f"argmax equal at {argmax_same:.1%} of positions")
    row = {"depth": depth, "params": sum(p.numel() for p in model.parameters()), "size": size, "export": export_s,
           "import": import_s, "hf_load": hf_load_s, "identical": identical, "rel_diff": rel_diff,
           "argmax_same": argmax_same}
    if depth in [int(d) for d in gen_depths.split(",") if d.strip()]:
        row["gen"] = time_generation(model, hf, tokenizer, val_texts)
    shutil.rmtree(out_dir)
    return row


def time_generation(model, hf, tokenizer, val_texts):
    """Greedy tok/s of transformers' generate and our Engine on the same prompt, rounds alternating."""
    prompt = tokenizer.encode(val_texts[0], prepend="<|bos|>")[:prompt_tokens]
    # random weights may write an end token early: both run the full length (the Engine stops at its enders)
    enders = [tokenizer.encode_special("<|assistant_end|>"), tokenizer.get_bos_token_id()]
    with torch.no_grad():
        model.lm_head.weight[enders] = 0.0
        hf.lm_head.weight[enders] = 0.0
    engine = Engine(model, tokenizer)
    contenders = {
        "hf": lambda: hf.generate(torch.tensor([prompt]), max_new_tokens=gen_tokens, min_new_tokens=gen_tokens,
                                  do_sample=False)[0, len(prompt):].tolist(),
        "ours": lambda: [col[0] for col, _ in engine.generate(prompt, max_tokens=gen_tokens, temperature=0.0)],
    }
    best, tokens = {}, {}
    for round_ in range(repeats + 1):  # round 0 warms up
        for name, generate in contenders.items():
            t0 = time.perf_counter()
            with torch.inference_mode():
                tokens[name] = generate()
            seconds = time.perf_counter() - t0
            if round_ > 0:
                best[name] = min(best.get(name, seconds), seconds)
    result = {name: len(tokens[name]) / best[name] for name in contenders}
    result["same"] = tokens["hf"] == tokens["ours"]
    print(f"  greedy generation, {prompt_tokens}-token prompt, {gen_tokens} new tokens: transformers "
          f"{result['hf']:.1f} tok/s, our Engine {result['ours']:.1f} tok/s ({result['ours'] / result['hf']:.2f}x), "
          f"same tokens: {result['same']}")
    return result


if __name__ == "__main__":
    main()
