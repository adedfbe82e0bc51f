"""
Midtraining: continue training the base model on conversations, so that it learns the chat format
(special tokens), multiple choice, calculator tool use and spelling. The same loop as pretraining, on a
different stream: conversations rendered to tokens and packed back to back (nanochat/chat_dataloader.py).
By default one epoch of the mixture below, as in the reference.

    python -m scripts.mid_train --device_type=cpu --max_seq_len=512 --device_batch_size=8 \
        --total_batch_size=4096 --num_iterations=30
    torchrun --standalone --nproc_per_node=8 -m scripts.mid_train -- --run=d20   # the speedrun
    python -m scripts.mid_train --help                                           # every setting, explained
    python -m scripts.mid_train --dry_run                                        # mixture, batch and horizon, then exit

Starts from <base>/base_checkpoints/<model_tag>/ (its last step); writes <base>/mid_checkpoints/<model_tag>/
with a log.jsonl of every step. `--resume_from_step=S` continues a stopped midtraining run exactly.
"""

import os
import time
from contextlib import nullcontext

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # less fragmentation on GPUs

import torch
import torch.distributed as dist

from nanochat.common import (compute_init, compute_cleanup, fail, print0, get_base_dir, autodetect_device_type, DummyWandb,
                             format_seconds)
from nanochat.configurator import configure
from nanochat.checkpoint_manager import (load_model, build_model, save_checkpoint,
                                         find_largest_model, CHECKPOINT_FOLDERS)
from nanochat.tokenizer import get_token_bytes
from nanochat.chat_dataloader import packed_conversation_loader
from nanochat.dataloader import gather_loader_state
from nanochat.loss_eval import evaluate_bpb
from nanochat.training import (capture_rng_state, restore_rng_state, warn_changed_settings, StepLog, StopRequest,
                               muon_momentum, saved_machine_choices, machine_choices, use_bf16_autocast,
                               use_torch_compile, finetuning_optimizers, reuse_thread_count,
                               stop_on_nonfinite_loss, set_learning_rates)
from nanochat.report import get_report
from nanochat import hardware
from tasks.common import TaskMixture
from tasks.smoltalk import SmolTalk
from tasks.mmlu import MMLU
from tasks.gsm8k import GSM8K
from tasks.customjson import CustomJSON, identity_conversations_path
from tasks.spellingbee import SimpleSpelling, SpellingBee

# -----------------------------------------------------------------------------
# Settings. Each can be overridden on the command line (--name=value); --help prints this block.

# Runtime: where the run happens and how it is logged
run = "dummy"  # wandb run name ("dummy" = no wandb logging)
device_type = ""  # cuda|cpu|mps ("" = autodetect: CUDA > MPS > CPU)
dtype = "auto"  # compute precision: auto|bfloat16|float32 (auto = bf16 on CUDA; on CPU only where measured faster)
compile = "auto"  # torch.compile the model: auto|true|false (auto = on CUDA, on CPU when the run is long enough)
dry_run = False  # print the mixture, batch and horizon, then exit
# Model: the checkpoint midtraining starts from, and where its own go
model_tag = ""  # base_checkpoints/<tag> to start from and mid_checkpoints/<tag> to write ("" = the largest)
base_step = -1  # step of the base checkpoint to start from (-1 = its last)
# Horizon: one pass over the mixture unless given
num_iterations = -1  # explicit number of optimisation steps (-1 = one epoch of the training mixture)
# Optimisation: batch, learning rates, schedule (the reference's, the same as pretraining's)
max_seq_len = 2048  # tokens per row of the packed stream
device_batch_size = 32  # rows per forward pass on each device (lower it if memory runs out)
total_batch_size = 524288  # tokens per optimisation step over all devices; gradient accumulation makes up the rest
embedding_lr = 0.2  # AdamW learning rate of the token embedding
unembedding_lr = 0.004  # AdamW learning rate of the lm_head
matrix_lr = 0.02  # Muon learning rate of the transformer's matrices
init_lr_frac = 1.0  # every learning rate above is scaled by this (1.0: midtraining trains at the pretraining rates)
weight_decay = 0.0  # AdamW weight decay of the embedding and lm_head
warmdown_start = 0.8  # the learning rate is flat until this fraction of the run, then falls linearly to 0
resume_from_step = -1  # continue this midtraining run from its checkpoint of this step (-1 = start from the base model)
# Evaluation: periodic work, any value <= 0 turns it off
eval_every = 150  # steps between validation bpb measurements on the validation mixture (and at the last step)
eval_tokens = 20*524288  # validation tokens per bpb measurement
save_every = -1  # steps between checkpoints (-1 = only at the end)
user_config = configure(globals(), __file__)  # apply --name=value overrides; the final settings, logged with the run
# -----------------------------------------------------------------------------

for name, allowed in (("dtype", ("auto", "bfloat16", "float32")), ("compile", ("auto", "true", "false"))):
    if globals()[name] not in allowed:
        fail(f"--{name} must be one of {'|'.join(allowed)}, got {globals()[name]!r}", every_rank_agrees=True)

# Compute: device, distributed group, seeds
device_type = device_type or autodetect_device_type()
ddp, ddp_rank, ddp_local_rank, ddp_world_size, device = compute_init(device_type)
master_process = ddp_rank == 0
synchronize = torch.cuda.synchronize if device_type == "cuda" else (lambda: None)
get_max_memory = torch.cuda.max_memory_allocated if device_type == "cuda" else (lambda: 0)

# Model: the base checkpoint, or the midtraining checkpoint we resume from
base_dir = get_base_dir()
resuming = resume_from_step >= 0
try:
    if not resuming:
        model, tokenizer, source_meta = load_model("base", device, phase="train", model_tag=model_tag or None,
                                                   step=base_step if base_step >= 0 else None)
        model_tag = model_tag or find_largest_model(os.path.join(base_dir, CHECKPOINT_FOLDERS["base"]))
        meta_data = None
    else:
        if not model_tag:
            model_tag = find_largest_model(os.path.join(base_dir, CHECKPOINT_FOLDERS["mid"]))
        checkpoint_dir = os.path.join(base_dir, CHECKPOINT_FOLDERS["mid"], model_tag)
        print0(f"Resuming from step {resume_from_step} of {checkpoint_dir}")
        model, tokenizer, meta_data = build_model(checkpoint_dir, resume_from_step, device, phase="train")
        source_meta = {"step": meta_data["base_step"]}
        harmless = {"run", "dry_run", "resume_from_step", "eval_every", "eval_tokens", "save_every", "model_tag"}
        warn_changed_settings(meta_data["user_config"], user_config, harmless)
except (FileNotFoundError, ValueError) as e:
    fail(str(e))
checkpoint_dir = os.path.join(base_dir, CHECKPOINT_FOLDERS["mid"], model_tag)
model_config_kwargs = dict(vars(model.config))
num_params = sum(p.numel() for p in model.parameters())
num_flops_per_token = model.estimate_flops()
if max_seq_len > model.config.sequence_len:
    print0(f"warning: max_seq_len={max_seq_len} is longer than the base model's training context "
           f"({model.config.sequence_len})")
pretrain_batch_size = source_meta.get("device_batch_size")
if pretrain_batch_size is not None and device_batch_size > pretrain_batch_size:
    print0(f"warning: the base model trained with device_batch_size={pretrain_batch_size}; "
           f"{device_batch_size} may not fit in memory")
print0(f"Model: {model_tag}, {num_params:,} parameters, {num_flops_per_token:e} FLOPs per token; "
       f"from base step {source_meta['step']}")

# Batch: micro-batches per rank, accumulated up to total_batch_size tokens per step
tokens_per_fwdbwd = device_batch_size * max_seq_len
world_tokens_per_fwdbwd = tokens_per_fwdbwd * ddp_world_size
if total_batch_size <= 0 or total_batch_size % world_tokens_per_fwdbwd != 0:
    fail(f"total_batch_size={total_batch_size:,} is not a multiple of device_batch_size x max_seq_len x world size = "
         f"{device_batch_size} x {max_seq_len} x {ddp_world_size} = {world_tokens_per_fwdbwd:,}")
grad_accum_steps = total_batch_size // world_tokens_per_fwdbwd
print0(f"Batch: {device_batch_size} x {max_seq_len} tokens x {ddp_world_size} ranks x {grad_accum_steps} accumulation "
       f"steps = {total_batch_size:,} tokens per step")

# Data: the reference's mixture (sizes on the hub; some offline copies are smaller stand-ins)
identity_path = identity_conversations_path()
train_dataset = TaskMixture([
    SmolTalk(split="train"),  # 460K general conversations
    MMLU(subset="auxiliary_train", split="train"),  # 100K multiple-choice problems (ARC, MC_TEST, OBQA, RACE)
    GSM8K(subset="main", split="train"),  # 8K grade-school math problems with calculator calls
    CustomJSON(filepath=identity_path),  # 1K synthetic conversations about who the model is...
    CustomJSON(filepath=identity_path),  # ...twice: two epochs of them
    SimpleSpelling(size=200_000, split="train"),  # "spell the word 'apple'"
    SpellingBee(size=80_000, split="train"),  # "how many 'r' are in 'strawberry'?"
])
val_dataset = TaskMixture([
    SmolTalk(split="test"),  # 24K conversations
    MMLU(subset="all", split="test", stop=5200),  # 5.2K of 14K, to match the training proportions
    GSM8K(subset="main", split="test", stop=420),  # 420 of 1.32K, likewise
])
# Tokens per epoch, estimated from a sample of conversations (the loop itself ends when the data wraps around)
sample_indices = range(0, len(train_dataset), max(1, len(train_dataset) // 500))
mean_tokens = sum(len(tokenizer.render_conversation(train_dataset[i])[0]) for i in sample_indices) / len(sample_indices)
epoch_steps_estimate = len(train_dataset) * mean_tokens / total_batch_size
print0(f"Training mixture: {len(train_dataset):,} conversations, ~{mean_tokens:.0f} tokens each: "
       f"~{epoch_steps_estimate:,.0f} steps per epoch | validation mixture: {len(val_dataset):,} conversations")
horizon_steps = num_iterations if num_iterations > 0 else epoch_steps_estimate
print0(f"Steps: {num_iterations if num_iterations > 0 else f'one epoch (~{epoch_steps_estimate:,.0f})'}")
if dry_run:
    derived = {
        "model_tag": model_tag, "num_params": num_params, "flops_per_token": num_flops_per_token,
        "world_size": ddp_world_size, "grad_accum_steps": grad_accum_steps,
        "train_conversations": len(train_dataset), "val_conversations": len(val_dataset),
        "mean_tokens_per_conversation": round(mean_tokens, 1), "epoch_steps_estimate": round(epoch_steps_estimate, 1),
        "num_iterations": num_iterations,
        "total_flops_estimate": num_flops_per_token * total_batch_size * horizon_steps,
    }
    print0("Dry run, derived numbers:")
    for key, value in derived.items():
        print0(f"  {key}: {value}")
    compute_cleanup()
    raise SystemExit(0)

# Precision, compilation and threads, chosen per device (a resumed run makes the choices it saved: exact continuation)
saved_choices = saved_machine_choices(meta_data)
reuse_thread_count(saved_choices, device)
use_bf16 = use_bf16_autocast(dtype, saved_choices, device)
autocast_ctx = torch.amp.autocast(device_type=device_type, dtype=torch.bfloat16) if use_bf16 else nullcontext()
peak_flops = hardware.peak_flops(device, dtype=torch.bfloat16 if use_bf16 else torch.float32) * ddp_world_size
# as in base_train: eager training runs near 20% of the measured matmul peak on CPU
use_compile = use_torch_compile(compile, saved_choices, device,
                                num_flops_per_token * total_batch_size * horizon_steps / (0.2 * peak_flops))
print0(f"Precision: {'bf16 autocast' if use_bf16 else 'fp32'} | torch.compile: {use_compile} | "
       f"CPU threads: {torch.get_num_threads()} | peak FLOP/s for MFU: {peak_flops:.3e}")
orig_model = model  # uncompiled: saved
model = torch.compile(model, dynamic=False) if use_compile else model

# Optimizers: AdamW for the embedding and lm_head, Muon for the matrices, at init_lr_frac of their rates
optimizers = finetuning_optimizers(orig_model, init_lr_frac, saved_choices,
                                   resume=(checkpoint_dir, resume_from_step, device, ddp_rank) if resuming else None,
                                   unembedding_lr=unembedding_lr, embedding_lr=embedding_lr, matrix_lr=matrix_lr,
                                   weight_decay=weight_decay)
adamw_optimizer, muon_optimizer = optimizers

# Data loaders: training resumes at its exact position; validation restarts at the beginning every time
train_loader = packed_conversation_loader(train_dataset, tokenizer, device_batch_size, max_seq_len, device,
                                          resume_state=meta_data["dataloader_state_dict"] if resuming else None)
build_val_loader = lambda: packed_conversation_loader(val_dataset, tokenizer, device_batch_size, max_seq_len, device)
eval_steps = max(1, eval_tokens // world_tokens_per_fwdbwd)
token_bytes = get_token_bytes(device=device)
x, y, loader_state = next(train_loader)  # the first batch; each micro-step fetches the next one early

def get_lr_multiplier(progress):
    """Flat, then linear to 0 over the last (1 - warmdown_start) of the run; progress goes 0 -> 1."""
    return 1.0 if progress < warmdown_start else max(0.0, (1 - progress) / (1 - warmdown_start))

# Loop state: everything besides weights, optimizer and data that a resumed run continues with
if not resuming:
    step, val_bpb, min_val_bpb, epoch_done = 0, None, float("inf"), False
    smooth_train_loss, total_training_time = 0.0, 0.0  # EMA of the loss; seconds of training after the first 10 steps
else:
    loop_state = meta_data["loop_state"]
    step, val_bpb = meta_data["step"], meta_data.get("val_bpb")
    min_val_bpb, smooth_train_loss = loop_state["min_val_bpb"], loop_state["smooth_train_loss"]
    total_training_time, epoch_done = loop_state["total_training_time"], loop_state["epoch_done"]
    restore_rng_state(loop_state["rng"], device)
consumed_loader_state = None  # data position just after the last batch trained on (what a checkpoint records)

def save_current_step():
    """Checkpoint of the current step: every rank's optimizer shard and data position, rank 0's model and meta."""
    loader_states = gather_loader_state(consumed_loader_state)  # a collective under torchrun
    meta = {
        "step": step,
        "val_bpb": val_bpb,
        "model_config": model_config_kwargs,
        "user_config": user_config,
        "base_step": source_meta["step"],
        "device_batch_size": device_batch_size,
        "max_seq_len": max_seq_len,
        "dataloader_state_dict": loader_states,
        "loop_state": {
            "min_val_bpb": min_val_bpb, "smooth_train_loss": smooth_train_loss,
            "total_training_time": total_training_time, "epoch_done": epoch_done,
            "rng": capture_rng_state(device),
            "machine_choices": machine_choices(use_bf16, muon_optimizer, use_compile),
        },
    }
    # every rank writes its optimizer shard; the meta file comes last, once all of them are on disk
    save_checkpoint(checkpoint_dir, step, orig_model.state_dict(), [opt.state_dict() for opt in optimizers], meta,
                    rank=ddp_rank, world_size=ddp_world_size)

step_log = StepLog(os.path.join(checkpoint_dir, "log.jsonl"), resume_step=step if resuming else None,
                   enabled=master_process)
if run != "dummy" and master_process:
    import wandb
    wandb_run = wandb.init(project="nanochat-mid", name=run, config=user_config,
                           dir=os.environ.get("WANDB_DIR", base_dir))
else:
    wandb_run = DummyWandb()
stop = StopRequest()  # Ctrl-C / SIGTERM: finish the step, save, exit

# -----------------------------------------------------------------------------
# Training loop: the pass after the last step only evaluates and saves
run_start = time.time()
first_step = step
interrupted = stop_now = False
while True:
    last_step = step == num_iterations if num_iterations > 0 else epoch_done
    if stop_now and not last_step:
        print0(f"Interrupted (Ctrl-C or SIGTERM): saving step {step} and exiting")
        if step != resume_from_step:
            save_current_step()
        print0(f"Stopped at step {step}. Continue with the same command plus --resume_from_step={step}")
        interrupted = True
        break

    # validation bits per byte on the validation mixture (all ranks take part)
    if eval_every > 0 and (last_step or step % eval_every == 0):
        model.eval()
        with autocast_ctx:
            val_bpb = evaluate_bpb(model, build_val_loader(), eval_steps, token_bytes)
        min_val_bpb = min(min_val_bpb, val_bpb)
        print0(f"Step {step:05d} | validation bpb: {val_bpb:.4f}")
        step_log.log({"step": step, "val_bpb": val_bpb})
        wandb_run.log({"step": step, "total_training_time": total_training_time, "val/bpb": val_bpb})
        model.train()

    if step != resume_from_step and (last_step or (save_every > 0 and step > 0 and step % save_every == 0)):
        save_current_step()
    if last_step:
        break

    # ---- one optimisation step ----
    synchronize()
    t0 = time.time()
    loss_sum = torch.zeros((), device=device)
    for micro_step in range(grad_accum_steps):
        with autocast_ctx:
            loss = model(x, y)
        loss_sum += loss.detach()
        (loss / grad_accum_steps).backward()
        consumed_loader_state = loader_state
        x, y, loader_state = next(train_loader)  # fetch the next batch while the device works
    # one exchange: mean loss, inf/nan anywhere, stop requested anywhere, data wrapped around anywhere
    step_flags = torch.stack([loss_sum / grad_accum_steps, (~torch.isfinite(loss_sum)).float(),
                              torch.tensor(float(stop.requested), device=device),
                              torch.tensor(float(loader_state["epoch_fraction"] >= 1), device=device)])
    if ddp:
        dist.all_reduce(step_flags, op=dist.ReduceOp.SUM)
    train_loss, any_nonfinite, any_stop, any_wrapped = step_flags.tolist()
    train_loss /= ddp_world_size
    stop_now, epoch_done = any_stop > 0, any_wrapped > 0
    if any_nonfinite > 0:
        stop_on_nonfinite_loss("training loss", step, checkpoint_dir)
    progress = step / num_iterations if num_iterations > 0 else min(loader_state["epoch_fraction"], 1.0)
    lrm = get_lr_multiplier(progress)
    set_learning_rates(optimizers, lrm)
    for group in muon_optimizer.param_groups:
        group["momentum"] = muon_momentum(step)
    for opt in optimizers:
        opt.step()
    model.zero_grad(set_to_none=True)
    synchronize()
    dt = time.time() - t0
    # ---------------------------------

    ema_beta = 0.9  # smoothing of the printed loss
    smooth_train_loss = ema_beta * smooth_train_loss + (1 - ema_beta) * train_loss
    debiased_smooth_loss = smooth_train_loss / (1 - ema_beta ** (step + 1))
    tok_per_sec = int(total_batch_size / dt)
    mfu = 100 * num_flops_per_token * total_batch_size / dt / peak_flops
    if step > 10:
        total_training_time += dt  # the first steps include compilation and warm-up
    elapsed = time.time() - run_start
    step_text = f"{step:05d}/{num_iterations:05d}" if num_iterations > 0 else f"{step:05d}"
    print0(f"step {step_text} ({100 * progress:.2f}%) | loss: {debiased_smooth_loss:.6f} | lrm: {lrm:.2f} | "
           f"dt: {dt * 1000:.2f}ms | tok/sec: {tok_per_sec:,} | mfu: {mfu:.2f} | elapsed: {format_seconds(elapsed)}")
    step_log.log({"step": step, "loss": debiased_smooth_loss, "raw_loss": train_loss, "lr_mult": lrm,
                  "progress": progress, "dt": dt, "tok_per_sec": tok_per_sec, "mfu": mfu,
                  "total_time": total_training_time})
    if step % 10 == 0:
        wandb_run.log({"step": step, "train/loss": debiased_smooth_loss, "train/lrm": lrm, "train/dt": dt,
                       "train/tok_per_sec": tok_per_sec, "train/mfu": mfu})
    step += 1

# -----------------------------------------------------------------------------
step_log.close()
if device_type == "cuda":
    print0(f"Peak memory usage: {get_max_memory() / 1024 / 1024:.2f}MiB")
print0(f"Total training time: {format_seconds(total_training_time)}")
if val_bpb is not None:
    print0(f"Minimum validation bpb: {min_val_bpb:.4f}")
timed_steps = step - 11  # total_training_time covers steps 11 .. step-1 (across resumes too)
timed = total_training_time > 0 and timed_steps > 0
mean_tok_per_sec = total_batch_size * timed_steps / total_training_time if timed else None
mean_mfu = 100 * num_flops_per_token * mean_tok_per_sec / peak_flops if timed else None
if mean_tok_per_sec:
    print0(f"Mean throughput after warm-up: {mean_tok_per_sec:,.0f} tok/s | MFU {mean_mfu:.2f}%")
if not interrupted:
    get_report().log(section="Midtraining", data=[
        user_config,
        {
            "Model tag": model_tag,
            "Base model": f"{model_tag} step {source_meta['step']}",
            "Training conversations": len(train_dataset),
            "Number of iterations": step,
            "DDP world size": ddp_world_size,
            "Precision": "bf16 autocast" if use_bf16 else "fp32",
            "torch.compile": use_compile,
        },
        {
            "Minimum validation bpb": min_val_bpb if val_bpb is not None else None,
            "Final validation bpb": val_bpb,
            "Final training loss": debiased_smooth_loss if step > first_step else None,
            "Tokens per second": int(mean_tok_per_sec) if mean_tok_per_sec else None,
            "MFU %": f"{mean_mfu:.2f}%" if mean_tok_per_sec else None,
            "Total training time": f"{total_training_time / 60:.2f}m",
            **({"Peak memory usage": f"{get_max_memory() / 1024 / 1024:.2f}MiB"} if device_type == "cuda" else {}),
        },
    ])
wandb_run.finish()
compute_cleanup()
