"""
Sample text from the latest base model checkpoint, streaming it as it is generated.

    python -m scripts.sample --prompt "The capital of France is"
    python -m scripts.sample --prompt "Once upon a time" --num_samples 3 --max_tokens 64 --temperature 0.8 --top_k 50

All samples are decoded together in one batch (one shared prompt prefill, see nanochat/engine.py).
Sample 1 is printed token by token as it is generated; the others are printed when the batch is
done (interleaving several live streams on one terminal would be unreadable).
"""

import glob
import os

import torch

from nanochat.chat import TextStream
from nanochat.checkpoint_manager import load_model
from nanochat.common import autodetect_device_type, compute_init, compute_cleanup, fail, get_base_dir
from nanochat.configurator import configure
from nanochat.decode import check_mode as check_decode_mode, choose_decode_dtype
from nanochat.engine import Engine, answer_enders

# -----------------------------------------------------------------------------
# Settings (--name=value on the command line; --help prints this block)

# What to generate
prompt = "The capital of France is"  # text the samples continue (a <|bos|> token is put in front)
num_samples = 1  # samples decoded in parallel from the same prompt
max_tokens = 64  # new tokens per sample at most (a sample also ends at <|bos|> or <|assistant_end|>)
temperature = 0.8  # 0 = greedy; higher = more random
top_k = 50  # sample among the k most likely tokens (0 = the whole vocabulary)
seed = 42  # sampling seed: same seed, same samples
# Which checkpoint
model_tag = ""  # checkpoint folder under base_checkpoints (empty = the largest model)
step = -1  # checkpoint step (-1 = the last one saved)
# Runtime
device_type = ""  # cuda|cpu|mps (empty = autodetect)
dtype = "auto"  # auto|float32|bfloat16 (auto: bf16 where measured faster, or compiled on bf16 units)
decode_mode = ""  # eager|compile|cuda_graph ("" = cuda_graph on CUDA, eager elsewhere; compile: seconds once, then faster)
configure(globals(), __file__)
# -----------------------------------------------------------------------------

if dtype not in ("auto", "float32", "bfloat16"):
    fail(f"--dtype must be auto, float32 or bfloat16, got {dtype!r}")
try:
    check_decode_mode(decode_mode)
except ValueError as e:
    fail(f"--decode-mode: {e}")

device_kind = device_type or autodetect_device_type()
_, _, _, _, device = compute_init(device_kind)
checkpoints_dir = os.path.join(get_base_dir(), "base_checkpoints")
if not glob.glob(os.path.join(checkpoints_dir, "*", "model_*.pt")):
    fail(f"No base model checkpoint in {checkpoints_dir}. Train one first, e.g.:\n"
         "  python -m scripts.base_train --depth=4 --device_type=cpu")
try:
    model, tokenizer, meta = load_model("base", device, phase="eval", model_tag=model_tag or None,
                                        step=None if step < 0 else step)
except FileNotFoundError as e:  # e.g. a --model_tag or --step that does not exist; no tokenizer
    fail(str(e))
decode_dtype = choose_decode_dtype(device, decode_mode) if dtype == "auto" else getattr(torch, dtype)

print(f"Model {meta.get('model_config')} at step {meta.get('step')}, decoding in {str(decode_dtype)[6:]} on {device}")
bos = tokenizer.get_bos_token_id()
row_enders = answer_enders(tokenizer)
prompt_tokens = tokenizer(prompt, prepend=bos)

engine = Engine(model, tokenizer, dtype=decode_dtype, decode_mode=decode_mode or None)
samples = [[] for _ in range(num_samples)]
done = [False] * num_samples
live = TextStream(tokenizer)  # holds back a character until all its bytes have come
if num_samples > 1:
    print(f"--- sample 1/{num_samples} ---")
print(prompt, end="", flush=True)
stream = engine.generate(prompt_tokens, num_samples=num_samples, max_tokens=max_tokens,
                         temperature=temperature, top_k=top_k or None, seed=seed)
for token_column, _ in stream:
    for i, token in enumerate(token_column):
        if done[i]:
            continue
        if token in row_enders:
            done[i] = True
            continue
        samples[i].append(token)
        if i == 0:
            print(live.add(token), end="", flush=True)
print(live.finish(), flush=True)
for i in range(1, num_samples):
    print(f"--- sample {i + 1}/{num_samples} ---")
    print(prompt + tokenizer.decode(samples[i]))
compute_cleanup()
