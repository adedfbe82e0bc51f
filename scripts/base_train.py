"""
Pretrain a base model from scratch. One flat script, read top to bottom:
settings, compute, tokenizer, model, horizon, optimizers, data, schedules, then the loop.

    python -m scripts.base_train --depth=4 --device_type=cpu      # a small model on a CPU
    torchrun --nproc_per_node=8 -m scripts.base_train --depth=20  # the speedrun model on 8 GPUs
    python -m scripts.base_train --help                           # every setting, explained
    python -m scripts.base_train --depth=26 --dry_run             # the derived numbers, then exit

Checkpoints go to <base>/base_checkpoints/<model_tag>/ (model, per-rank optimizer shards, meta),
with a log.jsonl of every step. `--resume_from_step=S` continues exactly where step S left off.
"""

import os
import time
import dataclasses
from contextlib import nullcontext

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # less fragmentation on GPUs

import torch
import torch.distributed as dist

from nanochat.common import (compute_init, compute_cleanup, fail, print0, get_base_dir, autodetect_device_type,
                             DummyWandb, format_seconds)
from nanochat.configurator import configure
from nanochat.checkpoint_manager import save_checkpoint, load_checkpoint
from nanochat.tokenizer import get_tokenizer, get_token_bytes
from nanochat.gpt import GPT, depth_config
from nanochat.dataloader import tokenizing_distributed_data_loader, gather_loader_state
from nanochat.loss_eval import evaluate_bpb
from nanochat.core_eval import evaluate_core, ensure_eval_bundle
from nanochat.engine import SAMPLE_PROMPTS, greedy_sample
from nanochat.training import (capture_rng_state, restore_rng_state, warn_changed_settings, StepLog, StopRequest,
                               muon_momentum, saved_machine_choices, machine_choices, use_bf16_autocast,
                               use_torch_compile, reuse_newton_schulz_dtype, reuse_thread_count,
                               stop_on_nonfinite_loss, set_learning_rates)
from nanochat.report import get_report
from nanochat import hardware

# -----------------------------------------------------------------------------
# Settings. Each can be overridden on the command line (--name=value); --help prints this block.

# Runtime: where the run happens and how it is logged
run = "dummy"  # wandb run name ("dummy" = no wandb logging)
device_type = ""  # cuda|cpu|mps ("" = autodetect: CUDA > MPS > CPU)
dtype = "auto"  # compute precision: auto|bfloat16|float32 (auto = bf16 on CUDA; on CPU only where measured faster)
compile = "auto"  # torch.compile the model: auto|true|false (auto = on CUDA; on CPU when the run is long enough)
dry_run = False  # print every derived number (dims, params, FLOPs, batch, horizon) and exit
# Model: one dial sets the architecture
depth = 20  # number of layers; width = 64*depth and heads = ceil(width/128) follow from it
max_seq_len = 2048  # context length in tokens
# Horizon: how long to train; the first positive one wins
num_iterations = -1  # explicit number of optimisation steps (-1 = off)
target_flops = -1.0  # train for this many FLOPs, for scaling-law sweeps (-1 = off)
target_param_data_ratio = 20  # train on this many tokens per parameter (Chinchilla: 20; -1 = off)
# Optimisation: batch, learning rates, schedule
device_batch_size = 32  # sequences per forward pass on each device (lower it if memory runs out)
total_batch_size = 524288  # tokens per optimisation step over all devices; gradient accumulation makes up the rest
embedding_lr = 0.2  # AdamW learning rate of the token embedding
unembedding_lr = 0.004  # AdamW learning rate of the lm_head
matrix_lr = 0.02  # Muon learning rate of the transformer's matrices
weight_decay = 0.0  # AdamW weight decay of the embedding and lm_head
grad_clip = 1.0  # clip the global gradient norm to this (0 = off)
warmup_ratio = 0.0  # fraction of the steps spent ramping the learning rate up
warmdown_ratio = 0.2  # fraction of the steps at the end spent ramping it down to final_lr_frac
final_lr_frac = 0.0  # learning rate at the last step, as a fraction of the initial one
resume_from_step = -1  # continue from this step's checkpoint, exactly as if never stopped (-1 = start fresh)
# Evaluation: periodic work, any value <= 0 turns it off
eval_every = 250  # steps between validation bpb measurements (and at the last step)
eval_tokens = 20*524288  # validation tokens per bpb measurement
core_metric_every = 2000  # steps between CORE metric estimates (and at the last step)
core_metric_max_per_task = 500  # examples per CORE task (-1 = all)
sample_every = 2000  # steps between samples from fixed prompts (and at the last step)
save_every = -1  # steps between checkpoints (-1 = only at the end)
save_every_minutes = -1.0  # also save once this much training time passed since the last save (-1 = off)
# Output: where checkpoints and the step log go
model_tag = ""  # folder under <base>/base_checkpoints ("" = d<depth>)
write_report = True  # log the "Base model training" report section (off in sweeps: each run would overwrite it)
user_config = configure(globals(), __file__)  # apply --name=value overrides; the final settings, logged with the run
# -----------------------------------------------------------------------------
session_start = time.time()  # (not a setting: set after them) the run's wall time adds up its sessions from here

for name, allowed in (("dtype", ("auto", "bfloat16", "float32")), ("compile", ("auto", "true", "false"))):
    if globals()[name] not in allowed:
        fail(f"--{name} must be one of {'|'.join(allowed)}, got {globals()[name]!r}", every_rank_agrees=True)

# Compute: device, distributed group, seeds
device_type = device_type or autodetect_device_type()
ddp, ddp_rank, ddp_local_rank, ddp_world_size, device = compute_init(device_type)
master_process = ddp_rank == 0  # rank 0 logs, writes the meta/model files and the step log
synchronize = torch.cuda.synchronize if device_type == "cuda" else (lambda: None)
get_max_memory = torch.cuda.max_memory_allocated if device_type == "cuda" else (lambda: 0)

# Tokenizer: needed for the vocabulary size, bits per byte and samples
try:
    tokenizer = get_tokenizer()
    token_bytes = get_token_bytes(device=device)
    vocab_size = tokenizer.get_vocab_size()
except FileNotFoundError as e:
    if not dry_run:
        fail(str(e))  # it names the command that trains the tokenizer
    vocab_size = 65536  # the speedrun's vocabulary, so a dry run can plan before any data exists
    print0(f"No tokenizer yet: assuming vocab_size={vocab_size:,} for this dry run")
print0(f"Vocab size: {vocab_size:,}")

# Model: everything follows from depth (aspect ratio 64, head dim 128)
try:
    model_config = depth_config(depth, vocab_size, max_seq_len)
except ValueError as e:
    fail(str(e), every_rank_agrees=True)
model_config_kwargs = dataclasses.asdict(model_config)
num_layers, model_dim = model_config.n_layer, model_config.n_embd
num_heads, num_kv_heads = model_config.n_head, model_config.n_kv_head
with torch.device("meta"):  # shapes only, no memory yet: the dry run needs no more
    model = GPT(model_config)
num_params = sum(p.numel() for p in model.parameters())
num_params_no_embedding = num_params - model.transformer.wte.weight.numel()  # the lookup table costs no FLOPs
num_flops_per_token = model.estimate_flops()
print0(f"Model: {num_layers} layers, dim {model_dim}, {num_heads} heads ({num_kv_heads} kv), "
       f"head dim {model_dim // num_heads}")
print0(f"Parameters: {num_params:,} | FLOPs per token: {num_flops_per_token:e}")

def batch_size_suggestions(total_batch_size, device_batch_size, max_seq_len, world_size):
    """
    Explain why total_batch_size is not a whole number of micro-batches and propose the nearest
    values that are: total batch sizes around it, and device batch sizes that divide it.
    """
    micro = device_batch_size * max_seq_len * world_size
    lower = (total_batch_size // micro) * micro
    upper = lower + micro
    totals = [t for t in (lower, upper) if t > 0]
    msg = (f"total_batch_size={total_batch_size:,} is not a whole number of micro-batches: "
           f"device_batch_size x max_seq_len x world_size = {device_batch_size} x {max_seq_len} x {world_size} "
           f"= {micro:,} tokens.\n"
           f"  nearest valid --total_batch_size: {', '.join(f'{t}' for t in totals)}")
    per_rank_rows, rem = divmod(total_batch_size, max_seq_len * world_size)
    if rem == 0:
        divisors = [d for d in range(1, per_rank_rows + 1) if per_rank_rows % d == 0]
        # the divisors closest to what was asked
        divisors = sorted(divisors, key=lambda d: (abs(d - device_batch_size), d))[:4]
        msg += f"\n  or a --device_batch_size that divides it: {', '.join(str(d) for d in sorted(divisors))}"
    else:
        msg += (f"\n  (no device_batch_size works: {total_batch_size:,} is not a multiple of "
                f"max_seq_len x world_size = {max_seq_len * world_size:,})")
    return msg

# Batch: micro-batches per rank, accumulated up to total_batch_size tokens per step
tokens_per_fwdbwd = device_batch_size * max_seq_len  # one forward/backward on one rank
world_tokens_per_fwdbwd = tokens_per_fwdbwd * ddp_world_size
if total_batch_size <= 0 or total_batch_size % world_tokens_per_fwdbwd != 0:
    fail(batch_size_suggestions(total_batch_size, device_batch_size, max_seq_len, ddp_world_size),
         every_rank_agrees=True)
grad_accum_steps = total_batch_size // world_tokens_per_fwdbwd
print0(f"Batch: {device_batch_size} x {max_seq_len} tokens x {ddp_world_size} ranks x {grad_accum_steps} "
       f"accumulation steps = {total_batch_size:,} tokens per step")

# Horizon: explicit steps, else a FLOPs budget, else a tokens:params ratio
if num_iterations > 0:
    horizon_source = "given by --num_iterations"
elif target_flops > 0:
    num_iterations = round(target_flops / (num_flops_per_token * total_batch_size))
    horizon_source = f"from target_flops={target_flops:e}"
elif target_param_data_ratio > 0:
    num_iterations = target_param_data_ratio * num_params // total_batch_size
    horizon_source = f"from tokens:params = {target_param_data_ratio}"
else:
    fail("no training horizon: set one of --num_iterations, --target_flops, --target_param_data_ratio "
         "to a positive value", every_rank_agrees=True)
if num_iterations <= 0:
    fail(f"the horizon ({horizon_source}) rounds to {num_iterations} steps: raise it or lower --total_batch_size",
         every_rank_agrees=True)
total_tokens = total_batch_size * num_iterations
print0(f"Steps: {num_iterations:,} ({horizon_source}) | tokens: {total_tokens:,} | "
       f"tokens:params {total_tokens / num_params:.2f} | training FLOPs: {num_flops_per_token * total_tokens:e}")
if dry_run:
    derived = {
        "num_layers": num_layers, "model_dim": model_dim, "num_heads": num_heads, "num_kv_heads": num_kv_heads,
        "head_dim": model_dim // num_heads, "vocab_size": vocab_size, "num_params": num_params,
        "flops_per_token": num_flops_per_token, "world_size": ddp_world_size,
        "tokens_per_micro_batch": world_tokens_per_fwdbwd, "grad_accum_steps": grad_accum_steps,
        "num_iterations": num_iterations, "total_tokens": total_tokens,
        "tokens_per_param": round(total_tokens / num_params, 4), "total_flops": num_flops_per_token * total_tokens,
    }
    print0("Dry run, derived numbers:")
    for key, value in derived.items():
        print0(f"  {key}: {value}")
    compute_cleanup()
    raise SystemExit(0)

# Model weights: fresh, or those of the checkpoint we resume from
base_dir = get_base_dir()
output_dirname = model_tag or f"d{depth}"
checkpoint_dir = os.path.join(base_dir, "base_checkpoints", output_dirname)
model.to_empty(device=device)
model.init_weights()  # before any measurement below draws random numbers: same weights every time
resuming = resume_from_step >= 0
if resuming:
    print0(f"Resuming from step {resume_from_step} of {checkpoint_dir}")
    try:
        model_data, optimizer_data, meta_data = load_checkpoint(checkpoint_dir, resume_from_step, device,
                                                                load_optimizer=True, rank=ddp_rank)
    except FileNotFoundError as e:
        fail(str(e))
    model.load_state_dict(model_data, strict=True, assign=True)
    del model_data
    # settings that change the optimisation itself (evaluation, sampling, saving and naming do not)
    harmless = {"run", "dry_run", "resume_from_step", "eval_every", "eval_tokens", "core_metric_every",
                "core_metric_max_per_task", "sample_every", "save_every", "save_every_minutes", "model_tag",
                "write_report"}
    warn_changed_settings(meta_data["user_config"], user_config, harmless)

# Precision, compilation and threads, chosen per device (a resumed run makes the choices it saved: exact continuation)
saved_choices = saved_machine_choices(meta_data if resuming else None)
reuse_thread_count(saved_choices, device)
use_bf16 = use_bf16_autocast(dtype, saved_choices, device)
autocast_ctx = torch.amp.autocast(device_type=device_type, dtype=torch.bfloat16) if use_bf16 else nullcontext()
# MFU is measured against the device's peak (datasheet on known GPUs; on CPU a matmul benchmark, run once now)
peak_flops = hardware.peak_flops(device, dtype=torch.bfloat16 if use_bf16 else torch.float32) * ddp_world_size
# eager training runs near 20% of the measured matmul peak on CPU
use_compile = use_torch_compile(compile, saved_choices, device, num_flops_per_token * total_tokens / (0.2 * peak_flops))
print0(f"Precision: {'bf16 autocast' if use_bf16 else 'fp32'} | torch.compile: {use_compile} | "
       f"CPU threads: {torch.get_num_threads()} | peak FLOP/s for MFU: {peak_flops:.3e}")
if device_type != "cuda":
    # The defaults are sized for GPUs; say up front what they cost here (training runs near 30% MFU on CPU).
    step_seconds = num_flops_per_token * total_batch_size / (0.3 * peak_flops)
    if step_seconds > 10:
        print0(f"Note: on this {device_type} one step of {total_batch_size:,} tokens takes about {step_seconds:.0f}s "
               f"and the whole run about {format_seconds(step_seconds * num_iterations)}. "
               f"For a quick look, the settings of "
               f"runs/runcpu.sh: --max_seq_len=512 --device_batch_size=8 --total_batch_size=4096 --num_iterations=800 "
               f"--eval_every=100 --eval_tokens=32768")

orig_model = model  # uncompiled: saved, evaluated with changing shapes, sampled from
model = torch.compile(model, dynamic=False) if use_compile else model  # inputs keep one shape while training

# Optimizers: AdamW for the embedding and lm_head, Muon for the matrices
optimizers = orig_model.setup_optimizers(unembedding_lr=unembedding_lr, embedding_lr=embedding_lr,
                                         matrix_lr=matrix_lr, weight_decay=weight_decay)
adamw_optimizer, muon_optimizer = optimizers
reuse_newton_schulz_dtype(muon_optimizer, saved_choices)
print0(f"Muon Newton-Schulz precision: {str(muon_optimizer.ns_dtype).removeprefix('torch.')}")
if resuming:
    for opt, state in zip(optimizers, optimizer_data):
        opt.load_state_dict(state)
    del optimizer_data

# Data: a training stream that can restart at an exact batch, and a fresh validation stream per eval
loader_resume_state = meta_data["dataloader_state_dict"] if resuming else None  # holds every rank's position
train_loader = tokenizing_distributed_data_loader(device_batch_size, max_seq_len, split="train", device=device,
                                                  resume_state_dict=loader_resume_state, tokenizer=tokenizer)
if core_metric_every > 0:  # fetch the CORE eval bundle now rather than fail hours into the run
    try:
        eval_bundle_dir = ensure_eval_bundle()
    except RuntimeError as e:
        fail(str(e))
build_val_loader = lambda: tokenizing_distributed_data_loader(device_batch_size, max_seq_len, split="val",
                                                              device=device, tokenizer=tokenizer)
eval_steps = max(1, eval_tokens // world_tokens_per_fwdbwd)  # micro-batches per validation pass, on every rank
try:  # missing shards: say so now, with the download command, rather than at the first evaluation
    x, y, loader_state = next(train_loader)  # the first batch; each micro-step fetches the next one early
    if eval_every > 0:
        next(build_val_loader())
except FileNotFoundError as e:
    fail(str(e))

# Schedules
def get_lr_multiplier(it):
    """Linear warmup to 1, flat, then linear warmdown to final_lr_frac at the last step."""
    warmup_iters = round(warmup_ratio * num_iterations)
    warmdown_iters = round(warmdown_ratio * num_iterations)
    if it < warmup_iters:
        return (it + 1) / warmup_iters
    if it <= num_iterations - warmdown_iters:
        return 1.0
    progress = (num_iterations - it) / warmdown_iters  # 1 -> 0 over the warmdown
    return progress + (1 - progress) * final_lr_frac

# Loop state: everything besides weights, optimizer and data that a resumed run must continue with
if not resuming:
    step = 0
    min_val_bpb = float("inf")
    smooth_train_loss = 0.0  # EMA of the training loss, debiased when printed
    total_training_time = 0.0  # seconds of optimisation, not counting the first 10 (warm-up) steps
    val_bpb = None
else:
    step = meta_data["step"]
    loop_state = meta_data["loop_state"]
    min_val_bpb = loop_state["min_val_bpb"]
    smooth_train_loss = loop_state["smooth_train_loss"]
    total_training_time = loop_state["total_training_time"]
    session_start -= loop_state.get("wall_time", 0.0)  # the sessions before this one count too
    val_bpb = meta_data.get("val_bpb")
    restore_rng_state(loop_state.get("rng", {}), device)
# the data position a checkpoint records: just after the last batch trained on (set by every micro-step;
# nothing is saved before the first step, since the step we resumed from is already on disk)
consumed_loader_state = None
last_save_time = time.time()  # for save_every_minutes

def save_current_step():
    """Checkpoint of the current step: every rank's optimizer shard and data position, rank 0's model and meta."""
    global last_save_time
    loader_states = gather_loader_state(consumed_loader_state)  # a collective under torchrun: {"ranks": [...]}
    meta = {
        "step": step,
        "val_bpb": val_bpb,
        "num_iterations": num_iterations,
        "num_params": num_params,
        "num_params_no_embedding": num_params_no_embedding,
        "flops_per_token": num_flops_per_token,
        "model_config": model_config_kwargs,
        "user_config": user_config,
        "device_batch_size": device_batch_size,
        "max_seq_len": max_seq_len,
        "dataloader_state_dict": loader_states,
        "loop_state": {
            "min_val_bpb": min_val_bpb,
            "smooth_train_loss": smooth_train_loss,
            "total_training_time": total_training_time,
            "wall_time": time.time() - session_start,  # since the run began, evaluations and start-up included
            "rng": capture_rng_state(device),
            "machine_choices": machine_choices(use_bf16, muon_optimizer, use_compile),
        },
    }
    # every rank writes its optimizer shard; the meta file comes last, once all of them are on disk
    save_checkpoint(checkpoint_dir, step, orig_model.state_dict(), [opt.state_dict() for opt in optimizers], meta,
                    rank=ddp_rank, world_size=ddp_world_size)
    last_save_time = time.time()

def stop_and_save():
    """Save the current step (unless it is the one resumed from: it is on disk) after a stop request."""
    print0(f"Interrupted (Ctrl-C or SIGTERM): saving step {step} and exiting")
    if step != resume_from_step:
        save_current_step()
    print0(f"Stopped at step {step}. Continue with the same command plus --resume_from_step={step}")

# Step log: one JSON line per step and per evaluation; a resumed run drops what came after its step
step_log = StepLog(os.path.join(checkpoint_dir, "log.jsonl"), resume_step=step if resuming else None,
                   enabled=master_process)

# wandb: only rank 0, only for named runs (WANDB_MODE=offline keeps it local)
if run != "dummy" and master_process:
    import wandb
    wandb_run = wandb.init(project="nanochat", name=run, config=user_config, dir=os.environ.get("WANDB_DIR", base_dir))
else:
    wandb_run = DummyWandb()

# Ctrl-C / SIGTERM: finish the current step (or evaluation task), save, exit cleanly (a second Ctrl-C stops at once)
stop = StopRequest()

# -----------------------------------------------------------------------------
# Training loop: runs num_iterations + 1 times so that the last pass only evaluates and saves
run_start = time.time()
first_step = step
interrupted = False
stop_now = False
save_due = False  # save_every_minutes has passed (decided together at the end of a step)
mfu = 0.0
results = {}
while True:
    last_step = step == num_iterations
    flops_so_far = num_flops_per_token * total_batch_size * step
    eval_due = eval_every > 0 and (last_step or step % eval_every == 0)
    core_due = core_metric_every > 0 and (last_step or (step > 0 and step % core_metric_every == 0))
    if (eval_due or core_due) and not stop_now and not last_step:
        stop_now = stop.anywhere(device)  # a stop that came after the step's exchange: no long evaluation first

    if stop_now and not last_step:  # Ctrl-C / SIGTERM reached some rank: all stop here
        stop_and_save()
        interrupted = True
        break

    # validation bits per byte (all ranks take part)
    if eval_due:
        model.eval()
        with autocast_ctx:
            val_bpb = evaluate_bpb(model, build_val_loader(), eval_steps, token_bytes)
        min_val_bpb = min(min_val_bpb, val_bpb)
        print0(f"Step {step:05d} | validation bpb: {val_bpb:.4f}")
        step_log.log({"step": step, "val_bpb": val_bpb})
        wandb_run.log({"step": step, "total_training_flops": flops_so_far, "total_training_time": total_training_time,
                       "val/bpb": val_bpb})
        model.train()

    # CORE metric (all ranks take part; the uncompiled model, since shapes vary). Minutes long: a stop
    # request ends it between tasks.
    if core_due:
        orig_model.eval()
        with autocast_ctx:
            results = evaluate_core(orig_model, tokenizer, device, eval_bundle_dir,
                                    max_per_task=core_metric_max_per_task, should_stop=lambda: stop.anywhere(device))
        if results is None:
            results = {}
            stop_and_save()
            interrupted = True
            break
        print0(f"Step {step:05d} | CORE metric: {results['core_metric']:.4f}")
        step_log.log({"step": step, "core_metric": results["core_metric"],
                      "core_tasks": len(results["centered_results"])})
        wandb_run.log({"step": step, "total_training_flops": flops_so_far, "core_metric": results["core_metric"],
                       "centered_results": results["centered_results"]})
        orig_model.train()

    # samples from fixed prompts (rank 0 only), greedy so they are comparable across steps
    if master_process and sample_every > 0 and (last_step or (step > 0 and step % sample_every == 0)):
        orig_model.eval()
        for prompt in SAMPLE_PROMPTS:
            print0(greedy_sample(orig_model, tokenizer, prompt, 16, autocast_ctx))
        orig_model.train()

    # checkpoint: at the end, every save_every steps and save_every_minutes (not the step resumed from: it is on disk)
    every_steps = save_every > 0 and step > 0 and step % save_every == 0
    if step != resume_from_step and (last_step or save_due or every_steps):
        save_current_step()
    save_due = False

    if last_step:
        break

    # ---- one optimisation step: accumulate gradients over micro-batches, clip, update ----
    synchronize()
    t0 = time.time()
    loss_sum = torch.zeros((), device=device)
    for micro_step in range(grad_accum_steps):
        with autocast_ctx:
            loss = model(x, y)
        loss_sum += loss.detach()
        (loss / grad_accum_steps).backward()  # .backward() sums gradients: average them instead
        consumed_loader_state = loader_state  # the batch in hand is consumed; a resume starts after it
        x, y, loader_state = next(train_loader)  # fetch the next batch while the device works
    # one small exchange tells every rank the mean loss, whether any rank saw inf/nan, was told to stop, or
    # (rank 0's clock) whether a timed save is due
    time_to_save = master_process and save_every_minutes > 0 and time.time() - last_save_time >= 60 * save_every_minutes
    step_flags = torch.stack([loss_sum / grad_accum_steps, (~torch.isfinite(loss_sum)).float(),
                              torch.tensor(float(stop.requested), device=device),
                              torch.tensor(float(time_to_save), device=device)])
    if ddp:
        dist.all_reduce(step_flags, op=dist.ReduceOp.SUM)
    train_loss, any_nonfinite, any_stop, any_save_due = step_flags.tolist()
    train_loss /= ddp_world_size
    stop_now = any_stop > 0
    save_due = any_save_due > 0
    if any_nonfinite > 0:
        step_log.close()
        stop_on_nonfinite_loss("training loss", step, checkpoint_dir,
                               advice="; a lower learning rate or --grad_clip may help")
    grad_norm = None
    if grad_clip > 0.0:
        grad_norm = torch.nn.utils.clip_grad_norm_(orig_model.parameters(), grad_clip).item()
    lrm = get_lr_multiplier(step)
    set_learning_rates(optimizers, lrm)
    for group in muon_optimizer.param_groups:
        group["momentum"] = muon_momentum(step)
    for opt in optimizers:
        opt.step()
    model.zero_grad(set_to_none=True)
    synchronize()
    dt = time.time() - t0
    # ---------------------------------------------------------------------------

    # logging
    ema_beta = 0.9  # smoothing of the printed loss
    smooth_train_loss = ema_beta * smooth_train_loss + (1 - ema_beta) * train_loss
    debiased_smooth_loss = smooth_train_loss / (1 - ema_beta ** (step + 1))  # the EMA starts at 0: undo that bias
    tok_per_sec = int(total_batch_size / dt)
    mfu = 100 * num_flops_per_token * total_batch_size / dt / peak_flops
    if step > 10:
        total_training_time += dt  # the first steps include compilation and warm-up
    steps_done = step + 1 - first_step
    elapsed = time.time() - run_start
    eta = elapsed / steps_done * (num_iterations - step - 1)
    grad_text = f" grad norm: {grad_norm:.4f} |" if grad_norm is not None else ""
    print0(f"step {step:05d}/{num_iterations:05d} ({100 * step / num_iterations:.2f}%) | "
           f"loss: {debiased_smooth_loss:.6f} |{grad_text} "
           f"lrm: {lrm:.2f} | dt: {dt * 1000:.2f}ms | tok/sec: {tok_per_sec:,} | mfu: {mfu:.2f} | "
           f"elapsed: {format_seconds(elapsed)} | eta: {format_seconds(eta)}")
    step_log.log({"step": step, "loss": debiased_smooth_loss, "raw_loss": train_loss, "grad_norm": grad_norm,
                  "lr_mult": lrm, "dt": dt, "tok_per_sec": tok_per_sec, "mfu": mfu, "total_time": total_training_time})
    if step % 100 == 0:
        wandb_run.log({"step": step, "total_training_flops": flops_so_far, "total_training_time": total_training_time,
                       "train/loss": debiased_smooth_loss, "train/lrm": lrm, "train/dt": dt,
                       "train/tok_per_sec": tok_per_sec, "train/mfu": mfu,
                       **({"train/grad_norm": grad_norm} if grad_norm is not None else {})})
    step += 1

# -----------------------------------------------------------------------------
step_log.close()
if device_type == "cuda":
    print0(f"Peak memory usage: {get_max_memory() / 1024 / 1024:.2f}MiB")
print0(f"Total training time: {format_seconds(total_training_time)}")
print0(f"Minimum validation bpb: {min_val_bpb:.4f}" if val_bpb is not None
       else "No validation bpb measured (eval_every <= 0)")
# total_training_time covers steps 11 .. step-1 (the first ones include compilation and warm-up)
mean_tok_per_sec = total_batch_size * (step - 11) / total_training_time if total_training_time > 0 else None
mean_mfu = 100 * num_flops_per_token * mean_tok_per_sec / peak_flops if mean_tok_per_sec else mfu  # else the last
if mean_tok_per_sec:
    print0(f"Mean throughput after warm-up: {mean_tok_per_sec:,.0f} tok/s | MFU {mean_mfu:.2f}%")
if not interrupted and write_report:
    get_report().log(section="Base model training", data=[
        user_config,
        {
            "Number of parameters": num_params,
            "Number of FLOPs per token": f"{num_flops_per_token:e}",
            "Calculated number of iterations": num_iterations,
            "Number of training tokens": total_tokens,
            "Tokens : Params ratio": total_tokens / num_params,
            "DDP world size": ddp_world_size,
            "Precision": "bf16 autocast" if use_bf16 else "fp32",
            "torch.compile": use_compile,
            "warmup_ratio": warmup_ratio,
            "warmdown_ratio": warmdown_ratio,
            "final_lr_frac": final_lr_frac,
        },
        {
            "Minimum validation bpb": min_val_bpb,
            "Final validation bpb": val_bpb,
            "Final training loss": debiased_smooth_loss if num_iterations > first_step else None,
            "CORE metric estimate": results.get("core_metric"),
            "Tokens per second": int(mean_tok_per_sec) if mean_tok_per_sec else None,
            "MFU %": f"{mean_mfu:.2f}%",
            "Total training flops": f"{flops_so_far:e}",
            "Total training time": f"{total_training_time / 60:.2f}m",
            **({"Peak memory usage": f"{get_max_memory() / 1024 / 1024:.2f}MiB"} if device_type == "cuda" else {}),
        },
    ])
wandb_run.finish()
compute_cleanup()
