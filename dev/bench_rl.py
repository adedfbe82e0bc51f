"""
One RL step (scripts/chat_rl.py) against the reference's (karpathy/nanochat at f37d45c, scripts/chat_rl.py) on the
same checkpoint, the same GSM8K problems and the same sampling seeds, in one process, the two taking turns step
by step: rollouts (sampling every completion with the Engine and the calculator), then the policy-gradient
forward/backward over them and the optimizer step. The reference runs as its chat_rl runs on a CPU: its Engine
and GPT in fp32 (its autocast is CUDA's), full logits for the loss. Ours as chat_rl runs here: the decode dtype
and mode it picks, the chunked loss under the training precision it picks, each pass's prompt computed once, and
no pass whose advantages are all 0 (--train_every_pass=true computes those too, to time the training passes).

    python -m dev.bench_rl --ref_dir=/path/to/reference --source=sft --model_tag=d4
    python -m dev.bench_rl --ref_dir=... --examples=2 --num_samples=8 --max_new_tokens=128 --steps=3

Needs a chat checkpoint and GSM8K (NANOCHAT_TASKS_URL, as for chat_rl). Prints per contender the rollout
tokens per second, the training tokens per second, the seconds of each half and of the whole step, how many
passes were trained, and ours against the reference (without --ref_dir: ours only).
"""

import os
import statistics
import time

import torch

from dev.reference import load_reference, reference_model
from nanochat import hardware
from nanochat.checkpoint_manager import load_model
from nanochat.common import autodetect_device_type, compute_init
from nanochat.configurator import configure
from nanochat.decode import choose_decode_dtype
from nanochat.engine import Engine
from nanochat.rl import (COMPILED_ROW_MULTIPLE, policy, policy_gradient_loss, rollout_seed, rollouts, training_rows,
                         zero_missing_grads)
from tasks.gsm8k import GSM8K

# Model and problems
ref_dir = os.environ.get("REF_DIR", "")  # a checkout of the reference nanochat (f37d45c)
source = "sft"  # sft|mid: the checkpoint both start from
model_tag = ""  # checkpoint folder ("" = the largest)
# One step, at chat_rl's settings unless changed
examples = 2  # problems per step (chat_rl: 16 over all ranks)
num_samples = 8  # completions per problem (chat_rl: 16)
device_batch_size = 8  # completions per sampling batch and per training pass (chat_rl: 8)
max_new_tokens = 128  # longest completion (chat_rl: 256)
steps = 3  # timed steps per contender, in turn (after one untimed step each)
# Ours
dtype = "auto"  # auto|float32|bfloat16: training precision and rollout dtype, as chat_rl's --dtype
decode_mode = ""  # as chat_rl's --decode_mode ("" = as chat_rl chooses: on CPU compiled when training is)
train_every_pass = False  # also compute the passes whose advantages are all 0 (chat_rl skips them), to time training
compile = "true"  # torch.compile our training passes, as chat_rl does for a long run (each row length before timing)
device_type = ""  # cuda|cpu|mps (empty = autodetect)
configure(globals(), __file__)

device_kind = device_type or autodetect_device_type()
_, _, _, _, device = compute_init(device_kind)
model, tokenizer, meta = load_model(source, device, phase="train", model_tag=model_tag or None)
task = GSM8K(subset="main", split="train")
if ref_dir:
    ref_gpt, ref_engine = load_reference(ref_dir, "gpt", "engine")
    ref_model = reference_model(ref_gpt, model).train()
    ref_optimizers = ref_model.setup_optimizers()
    ref = ref_engine.Engine(ref_model, tokenizer)

# ours as chat_rl sets itself up
use_bf16 = dtype == "bfloat16" or (dtype == "auto" and hardware.choose_autocast_dtype(device) == torch.bfloat16)
rollout_dtype = choose_decode_dtype(device) if dtype == "auto" else getattr(torch, dtype)
optimizers = model.setup_optimizers()
passes = num_samples // device_batch_size
use_compile = compile == "true"
rollout_mode = decode_mode or ("compile" if device.type == "cpu" and use_compile else None)
engine = Engine(model, tokenizer, dtype=rollout_dtype, decode_mode=rollout_mode, timed_threads=False,
                live_weights=True)
token_losses = policy(model, compile=use_compile)
row_multiple = COMPILED_ROW_MULTIPLE if use_compile else 1


def compile_row_lengths():
    """One training pass per padded length of the rows after the prompt (the last prompt token and up to
    max_new_tokens more), so that compiling is not timed; the gradients are thrown away."""
    prefix = torch.zeros(1, 2 * row_multiple + 1, dtype=torch.long, device=device)  # any length: it is symbolic
    for length in range(row_multiple, max_new_tokens + row_multiple, row_multiple):
        rows = torch.zeros(device_batch_size, length, dtype=torch.long, device=device)
        advantages = torch.ones(device_batch_size, device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            policy_gradient_loss(token_losses, prefix, rows, rows, advantages, 1.0).backward()
    model.zero_grad(set_to_none=True)


def our_step(step):
    t0 = time.perf_counter()
    batches = [rollouts(engine, tokenizer, task, i, step, num_samples, device_batch_size, max_new_tokens,
                        pad_multiple=row_multiple) for i in range(examples)]
    t1 = time.perf_counter()
    rows, trained_passes = 0, 0  # the rows' tokens without the padding to row_multiple, as the reference pads
    for batch in batches:
        for b0 in range(0, num_samples, device_batch_size):
            inputs, targets = batch.inputs[b0:b0 + device_batch_size], batch.targets[b0:b0 + device_batch_size]
            advantages = batch.advantages[b0:b0 + device_batch_size]
            if not (advantages.any() or train_every_pass):
                continue
            normalizer = (targets >= 0).sum().clamp(min=1) * passes * examples
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                policy_gradient_loss(token_losses, batch.prefix, inputs, targets, advantages, normalizer).backward()
            rows += batch.row_tokens // passes
            trained_passes += 1
    zero_missing_grads(model)
    for opt in optimizers:
        opt.step()
    model.zero_grad(set_to_none=True)
    t2 = time.perf_counter()
    return (t1 - t0, t2 - t1, sum(b.completion_tokens for b in batches), rows, [b.sequences for b in batches],
            trained_passes)


def reference_step(step):
    """The reference's chat_rl step: its Engine samples, its GPT computes the full logits' per-token loss."""
    t0 = time.perf_counter()
    batches = []
    for i in range(examples):
        conversation = task[i]
        prompt = tokenizer.render_for_completion(conversation)
        sequences, masks = [], []
        for b in range(passes):
            seqs, ms = ref.generate_batch(prompt, num_samples=device_batch_size, max_tokens=max_new_tokens,
                                          temperature=1.0, top_k=50, seed=rollout_seed(step, i, b))
            sequences += seqs
            masks += ms
        rewards = torch.tensor([task.reward(conversation, tokenizer.decode(s[len(prompt):])) for s in sequences])
        inputs, targets = training_rows(sequences, masks, tokenizer.encode_special("<|assistant_end|>"), device)
        batches.append((sequences, len(prompt), inputs, targets, rewards - rewards.mean()))
    t1 = time.perf_counter()
    for _, _, inputs_all, targets_all, advantages in batches:
        for b0 in range(0, num_samples, device_batch_size):
            inputs, targets = inputs_all[b0:b0 + device_batch_size], targets_all[b0:b0 + device_batch_size]
            logp = -ref_model(inputs, targets, loss_reduction="none").view_as(inputs)
            num_valid = (targets >= 0).sum().clamp(min=1)
            (-(logp * advantages[b0:b0 + device_batch_size, None]).sum() / (num_valid * passes * examples)).backward()
    for opt in ref_optimizers:
        opt.step()
    ref_model.zero_grad(set_to_none=True)
    t2 = time.perf_counter()
    generated = sum(len(s) - n for sequences, n, _, _, _ in batches for s in sequences)
    rows = sum(inputs.numel() for _, _, inputs, _, _ in batches)
    return t1 - t0, t2 - t1, generated, rows, [b[0] for b in batches], examples * passes


print(f"CPU: {hardware.cpu_description()}, {torch.get_num_threads()} threads" if device.type == "cpu" else
      f"Device: {torch.cuda.get_device_name(device)}")
print(f"Model: {source} step {meta['step']}, {model.config.n_layer} layers, width {model.config.n_embd}; "
      f"{examples} problems x {num_samples} samples, up to {max_new_tokens} new tokens, batches of {device_batch_size}")
print(f"Ours: rollouts in {str(rollout_dtype)[6:]} ({rollout_mode or 'default'} decoding), training "
      f"{'bf16 autocast' if use_bf16 else 'fp32'}{', compiled' if use_compile else ''}"
      + ("; reference: fp32" if ref_dir else ""))
if use_compile:
    t0 = time.perf_counter()
    compile_row_lengths()
    print(f"Compiling our training pass for each row length after the prompt: {time.perf_counter() - t0:.0f} s")
contenders = {"reference": reference_step, "ours": our_step} if ref_dir else {"ours": our_step}
results = {name: [] for name in contenders}
for step in range(steps + 1):  # step 0 warms up (compiles, if ours does)
    for name, run in contenders.items():
        results[name].append(run(step))
print(f"\n{'contender':10} {'rollout tok/s':>13} {'train tok/s':>11} {'rollouts s':>10} {'training s':>10} {'step s':>7}"
      f" {'passes trained':>14}  (median of {steps} steps after one warm-up; train tok/s over the passes trained)")
for name in contenders:
    timed = results[name][1:]
    rollout = statistics.median(r[2] / r[0] for r in timed)
    train = statistics.median(r[3] / r[1] for r in timed)
    rollout_seconds, train_seconds, step_seconds = (statistics.median(x) for x in zip(*[(r[0], r[1], r[0] + r[1])
                                                                                         for r in timed]))
    trained = f"{sum(r[5] for r in timed)}/{len(timed) * examples * passes}"
    print(f"{name:10} {rollout:13,.0f} {train:11,.0f} {rollout_seconds:10.2f} {train_seconds:10.2f} {step_seconds:7.2f}"
          f" {trained:>14}")
if ref_dir:
    ratios = [(r[0] + r[1]) / (o[0] + o[1]) for r, o in zip(results["reference"][1:], results["ours"][1:])]
    same_first = results["ours"][0][4] == results["reference"][0][4]
    print(f"\nours vs reference, whole step: {statistics.median(ratios):.2f}x (median of the paired steps: "
          f"{', '.join(f'{x:.2f}' for x in ratios)}); same completions at the first step: {same_first}"
          + ("" if same_first else " (different decode dtypes sample differently)"))
