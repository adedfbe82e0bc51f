"""
Supervised fine-tuning (SFT): adapt the midtrained model to single conversations. Unlike midtraining,
each row of a batch is one conversation, padded to the longest of the batch, and the loss counts only
the tokens the assistant writes (mask 1 in tokenizer.render_conversation; targets -1 elsewhere).
One epoch of the mixture below at a small learning rate, as in the reference.

    python -m scripts.chat_sft --device_type=cpu --num_iterations=30 --device_batch_size=4
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_sft -- --run=d20   # the speedrun
    python -m scripts.chat_sft --source=base                                    # skip midtraining
    python -m scripts.chat_sft --help                                           # every setting, explained

Starts from <base>/mid_checkpoints/<model_tag>/ (or base_checkpoints with --source=base); writes
<base>/chatsft_checkpoints/<model_tag>/ with a log.jsonl. `--resume_from_step=S` continues exactly.
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
from nanochat.chat_dataloader import sft_loader
from nanochat.dataloader import gather_loader_state
from nanochat.chat_eval import run_chat_eval
from nanochat.engine import Engine
from nanochat.training import (capture_rng_state, restore_rng_state, warn_changed_settings, StepLog, StopRequest,
                               saved_machine_choices, machine_choices, use_bf16_autocast, finetuning_optimizers,
                               reuse_thread_count, stop_on_nonfinite_loss, set_learning_rates)
from nanochat.report import get_report
from nanochat import hardware
from tasks import load_eval_task
from tasks.common import TaskMixture
from tasks.arc import ARC
from tasks.gsm8k import GSM8K
from tasks.smoltalk import SmolTalk
from tasks.customjson import CustomJSON, identity_conversations_path
from tasks.spellingbee import SimpleSpelling, SpellingBee

# -----------------------------------------------------------------------------
# Settings. Each can be overridden on the command line (--name=value); --help prints this block.

# Runtime: where the run happens and how it is logged
run = "dummy"  # wandb run name ("dummy" = no wandb logging)
device_type = ""  # cuda|cpu|mps ("" = autodetect: CUDA > MPS > CPU)
dtype = "auto"  # compute precision: auto|bfloat16|float32 (auto = bf16 on CUDA; on CPU only where measured faster)
dry_run = False  # print the mixture, batch and horizon, then exit
# Model: the checkpoint SFT starts from, and where its own go
source = "mid"  # mid|base: fine-tune the midtrained model (the speedrun) or the base model directly
model_tag = ""  # <source folder>/<tag> to start from and chatsft_checkpoints/<tag> to write ("" = the largest)
source_step = -1  # step of the source checkpoint (-1 = its last)
# Horizon: epochs of the mixture unless given
num_epochs = 1  # passes over the training mixture
num_iterations = -1  # explicit number of optimisation steps (-1 = from num_epochs)
# Optimisation: batch and learning rates (the reference's)
device_batch_size = 4  # conversations per forward pass on each device (rows are as long as the longest one)
target_examples_per_step = 32  # conversations per step over all devices; gradient accumulation makes up the rest
max_seq_len = 2048  # conversations are cut to this many tokens
embedding_lr = 0.2  # AdamW learning rate of the token embedding
unembedding_lr = 0.004  # AdamW learning rate of the lm_head
matrix_lr = 0.02  # Muon learning rate of the transformer's matrices
init_lr_frac = 0.02  # every learning rate above is scaled by this: fine-tuning moves the weights gently
weight_decay = 0.0  # AdamW weight decay of the embedding and lm_head
resume_from_step = -1  # continue this SFT run from its checkpoint of this step (-1 = start from the source model)
# Evaluation: periodic work, any value <= 0 turns it off
eval_every = 100  # steps between validation losses on SmolTalk test (and at the last step)
eval_steps = 100  # batches per validation loss
eval_metrics_every = 200  # steps between MMLU and ARC-Easy accuracies (and at the last step)
eval_metrics_max_problems = 1024  # problems per accuracy (-1 = all)
save_every = -1  # steps between checkpoints (-1 = only at the end)
user_config = configure(globals(), __file__)  # apply --name=value overrides; the final settings, logged with the run
# -----------------------------------------------------------------------------

if dtype not in ("auto", "bfloat16", "float32"):
    fail(f"--dtype must be one of auto|bfloat16|float32, got {dtype!r}", every_rank_agrees=True)
if source not in ("mid", "base"):
    fail(f"--source must be mid or base, got {source!r}", every_rank_agrees=True)

# Compute: device, distributed group, seeds
device_type = device_type or autodetect_device_type()
ddp, ddp_rank, ddp_local_rank, ddp_world_size, device = compute_init(device_type)
master_process = ddp_rank == 0
synchronize = torch.cuda.synchronize if device_type == "cuda" else (lambda: None)
get_max_memory = torch.cuda.max_memory_allocated if device_type == "cuda" else (lambda: 0)

# Model: the source checkpoint, or the SFT checkpoint we resume from
base_dir = get_base_dir()
resuming = resume_from_step >= 0
try:
    if not resuming:
        model, tokenizer, source_meta = load_model(source, device, phase="train", model_tag=model_tag or None,
                                                   step=source_step if source_step >= 0 else None)
        model_tag = model_tag or find_largest_model(os.path.join(base_dir, CHECKPOINT_FOLDERS[source]))
        meta_data = None
    else:
        if not model_tag:
            model_tag = find_largest_model(os.path.join(base_dir, CHECKPOINT_FOLDERS["sft"]))
        checkpoint_dir = os.path.join(base_dir, CHECKPOINT_FOLDERS["sft"], model_tag)
        print0(f"Resuming from step {resume_from_step} of {checkpoint_dir}")
        model, tokenizer, meta_data = build_model(checkpoint_dir, resume_from_step, device, phase="train")
        source_meta = {"step": meta_data["source_step"]}
        harmless = {"run", "dry_run", "resume_from_step", "eval_every", "eval_steps", "eval_metrics_every",
                    "eval_metrics_max_problems", "save_every", "model_tag"}
        warn_changed_settings(meta_data["user_config"], user_config, harmless)
except (FileNotFoundError, ValueError) as e:
    fail(str(e))
checkpoint_dir = os.path.join(base_dir, CHECKPOINT_FOLDERS["sft"], model_tag)
model_config_kwargs = dict(vars(model.config))
num_flops_per_token = model.estimate_flops()
print0(f"Model: {source} {model_tag} step {source_meta['step']}, "
       f"{sum(p.numel() for p in model.parameters()):,} parameters")

# Data: the reference's mixture (sizes on the hub; some offline copies are smaller stand-ins)
identity_path = identity_conversations_path()
train_dataset = TaskMixture([
    ARC(subset="ARC-Easy", split="train"),  # 2.3K multiple-choice science questions
    ARC(subset="ARC-Challenge", split="train"),  # 1.1K harder ones
    GSM8K(subset="main", split="train"),  # 8K math problems with calculator calls
    SmolTalk(split="train", stop=10_000),  # 10K general conversations
    CustomJSON(filepath=identity_path),  # 1K conversations about who the model is
    SimpleSpelling(size=300, split="train"),  # "spell the word 'apple'"
    SpellingBee(size=300, split="train"),  # "how many 'r' are in 'strawberry'?"
])
val_dataset = SmolTalk(split="test")  # general conversations

# Batch and horizon: examples (conversations), not tokens, per step
examples_per_fwdbwd = device_batch_size * ddp_world_size
if target_examples_per_step <= 0 or target_examples_per_step % examples_per_fwdbwd != 0:
    fail(f"target_examples_per_step={target_examples_per_step} is not a multiple of device_batch_size x world size = "
         f"{device_batch_size} x {ddp_world_size} = {examples_per_fwdbwd}")
grad_accum_steps = target_examples_per_step // examples_per_fwdbwd
if num_iterations <= 0:
    num_iterations = (len(train_dataset) // target_examples_per_step) * num_epochs
if num_iterations <= 0:
    fail(f"the mixture ({len(train_dataset)} conversations) is smaller than one step of {target_examples_per_step}")
print0(f"Batch: {device_batch_size} conversations x {ddp_world_size} ranks x {grad_accum_steps} accumulation steps = "
       f"{target_examples_per_step} per step")
print0(f"Training mixture: {len(train_dataset):,} conversations | validation: {len(val_dataset):,} | "
       f"steps: {num_iterations:,}")
if dry_run:
    derived = {"model_tag": model_tag, "world_size": ddp_world_size, "grad_accum_steps": grad_accum_steps,
               "train_conversations": len(train_dataset), "val_conversations": len(val_dataset),
               "num_iterations": num_iterations,
               "epochs": num_iterations * target_examples_per_step / len(train_dataset)}
    print0("Dry run, derived numbers:")
    for key, value in derived.items():
        print0(f"  {key}: {value}")
    compute_cleanup()
    raise SystemExit(0)

# Precision and threads (a resumed run makes the choices it saved); no torch.compile: every batch has another length
saved_choices = saved_machine_choices(meta_data)
reuse_thread_count(saved_choices, device)
use_bf16 = use_bf16_autocast(dtype, saved_choices, device)
autocast_ctx = torch.amp.autocast(device_type=device_type, dtype=torch.bfloat16) if use_bf16 else nullcontext()
peak_flops = hardware.peak_flops(device, dtype=torch.bfloat16 if use_bf16 else torch.float32) * ddp_world_size
print0(f"Precision: {'bf16 autocast' if use_bf16 else 'fp32'} | CPU threads: {torch.get_num_threads()} | "
       f"peak FLOP/s for MFU: {peak_flops:.3e}")
engine = Engine(model, tokenizer, timed_threads=False)  # accuracy evaluations, the same in a resumed run
accuracy_tasks = ({key: load_eval_task(name) for name, key in (("MMLU", "mmlu_acc"), ("ARC-Easy", "arc_easy_acc"))}
                  if eval_metrics_every > 0 else {})

# Optimizers at init_lr_frac of the base rates, decaying linearly to 0 over the run
optimizers = finetuning_optimizers(model, init_lr_frac, saved_choices,
                                   resume=(checkpoint_dir, resume_from_step, device, ddp_rank) if resuming else None,
                                   unembedding_lr=unembedding_lr, embedding_lr=embedding_lr, matrix_lr=matrix_lr,
                                   weight_decay=weight_decay)
adamw_optimizer, muon_optimizer = optimizers

def get_lr_multiplier(it):
    return 1.0 - it / num_iterations

# Data loaders: training resumes at its exact position; validation restarts at the beginning every time
train_loader = sft_loader(train_dataset, tokenizer, device_batch_size, device, max_tokens=max_seq_len,
                          resume_state=meta_data["dataloader_state_dict"] if resuming else None)
build_val_loader = lambda: sft_loader(val_dataset, tokenizer, device_batch_size, device, max_tokens=max_seq_len)

# Loop state: everything besides weights, optimizer and data that a resumed run continues with
if not resuming:
    step, val_loss, train_loss, total_training_time, total_tokens, metrics = 0, None, None, 0.0, 0, {}
else:
    loop_state = meta_data["loop_state"]
    step, val_loss, metrics = meta_data["step"], meta_data.get("val_loss"), meta_data.get("metrics", {})
    train_loss, total_tokens = loop_state["train_loss"], loop_state["total_tokens"]
    total_training_time = loop_state["total_training_time"]
    restore_rng_state(loop_state["rng"], device)
# the data position a checkpoint records: just after the last batch trained on
consumed_loader_state = meta_data["dataloader_state_dict"] if resuming else None

def save_current_step(with_optimizer=True):
    """Checkpoint of the current step: every rank's data position (and optimizer shard), rank 0's model and meta."""
    loader_states = gather_loader_state(consumed_loader_state)  # a collective under torchrun
    meta = {
        "step": step,
        "val_loss": val_loss,
        "metrics": metrics,
        "model_config": model_config_kwargs,
        "user_config": user_config,
        "source": source,
        "source_step": source_meta["step"],
        "dataloader_state_dict": loader_states,
        "loop_state": {
            "train_loss": train_loss, "total_training_time": total_training_time, "total_tokens": total_tokens,
            "rng": capture_rng_state(device),
            "machine_choices": machine_choices(use_bf16, muon_optimizer),
        },
    }
    optimizer_data = [opt.state_dict() for opt in optimizers] if with_optimizer else None
    # every rank writes its optimizer shard; the meta file comes last, once all of them are on disk
    save_checkpoint(checkpoint_dir, step, model.state_dict(), optimizer_data, meta, rank=ddp_rank,
                    world_size=ddp_world_size)

step_log = StepLog(os.path.join(checkpoint_dir, "log.jsonl"), resume_step=step if resuming else None,
                   enabled=master_process)
if run != "dummy" and master_process:
    import wandb
    wandb_run = wandb.init(project="nanochat-sft", name=run, config=user_config,
                           dir=os.environ.get("WANDB_DIR", base_dir))
else:
    wandb_run = DummyWandb()
stop = StopRequest()  # Ctrl-C / SIGTERM: finish the step, save, exit

# -----------------------------------------------------------------------------
# Training loop: the pass after the last step only evaluates and saves
first_step = step
interrupted = stop_now = False
max_problems = eval_metrics_max_problems if eval_metrics_max_problems > 0 else None
while True:
    last_step = step == num_iterations
    if stop_now and not last_step:
        print0(f"Interrupted (Ctrl-C or SIGTERM): saving step {step} and exiting")
        if step != resume_from_step:
            save_current_step()
        print0(f"Stopped at step {step}. Continue with the same command plus --resume_from_step={step}")
        interrupted = True
        break

    # validation loss: the mean over eval_steps batches of SmolTalk test (all ranks take part)
    if eval_every > 0 and (last_step or step % eval_every == 0):
        model.eval()
        val_loader = build_val_loader()
        losses = torch.zeros(eval_steps, device=device)
        with torch.no_grad(), autocast_ctx:
            for i in range(eval_steps):
                inputs, targets, _ = next(val_loader)
                losses[i] = model(inputs, targets)
        val_loss = losses.mean()
        if ddp:
            dist.all_reduce(val_loss, op=dist.ReduceOp.AVG)
        val_loss = val_loss.item()
        print0(f"Step {step:05d} | validation loss: {val_loss:.6f}")
        step_log.log({"step": step, "val_loss": val_loss})
        wandb_run.log({"step": step, "val_loss": val_loss})
        model.train()

    # accuracy on the multiple-choice tasks (quick: one forward pass per batch of problems)
    if eval_metrics_every > 0 and (last_step or (step > 0 and step % eval_metrics_every == 0)):
        model.eval()
        with torch.no_grad(), autocast_ctx:  # no gradients: twice the training batch fits
            for key, task in accuracy_tasks.items():
                metrics[key], _ = run_chat_eval(task, tokenizer, model, engine, batch_size=2 * device_batch_size,
                                                max_problems=max_problems)
        print0(f"Step {step:05d} | " + ", ".join(f"{k}: {v:.4f}" for k, v in metrics.items()))
        step_log.log({"step": step, **metrics})
        wandb_run.log({"step": step, **metrics})
        model.train()

    if step != resume_from_step and (last_step or (save_every > 0 and step > 0 and step % save_every == 0)):
        save_current_step(with_optimizer=not last_step)  # the final model is for chatting: no optimizer (as the ref.)
    if last_step:
        break

    # ---- one optimisation step ----
    synchronize()
    t0 = time.time()
    loss_sum = torch.zeros((), device=device)
    step_counts = torch.zeros(2, dtype=torch.long, device=device)  # supervised tokens, tokens processed (with padding)
    for micro_step in range(grad_accum_steps):
        inputs, targets, consumed_loader_state = next(train_loader)
        with autocast_ctx:
            loss = model(inputs, targets)
        loss_sum += loss.detach()
        (loss / grad_accum_steps).backward()
        step_counts += torch.stack([(targets >= 0).sum(), torch.tensor(targets.numel(), device=device)])
    step_flags = torch.stack([loss_sum / grad_accum_steps, (~torch.isfinite(loss_sum)).float(),
                              torch.tensor(float(stop.requested), device=device)])
    if ddp:
        dist.all_reduce(step_flags, op=dist.ReduceOp.SUM)
        dist.all_reduce(step_counts, op=dist.ReduceOp.SUM)
    train_loss, any_nonfinite, any_stop = step_flags.tolist()
    train_loss /= ddp_world_size
    stop_now = any_stop > 0
    if any_nonfinite > 0:
        stop_on_nonfinite_loss("training loss", step, checkpoint_dir)
    lrm = get_lr_multiplier(step)
    set_learning_rates(optimizers, lrm)
    for opt in optimizers:
        opt.step()
    model.zero_grad(set_to_none=True)
    synchronize()
    dt = time.time() - t0
    # ---------------------------------

    supervised_tokens, processed_tokens = step_counts.tolist()
    total_tokens += processed_tokens
    total_training_time += dt
    tok_per_sec = int(processed_tokens / dt)
    mfu = 100 * num_flops_per_token * processed_tokens / dt / peak_flops
    print0(f"step {step:05d}/{num_iterations:05d} | loss: {train_loss:.6f} | lrm: {lrm:.4f} | "
           f"supervised tokens: {supervised_tokens:,} | dt: {dt * 1000:.0f}ms | tok/sec: {tok_per_sec:,} | "
           f"mfu: {mfu:.2f}")
    step_log.log({"step": step, "loss": train_loss, "lr_mult": lrm, "num_tokens": supervised_tokens,
                  "tokens": processed_tokens, "dt": dt, "tok_per_sec": tok_per_sec, "mfu": mfu,
                  "total_time": total_training_time})
    wandb_run.log({"step": step, "lrm": lrm, "train_loss": train_loss, "num_tokens": supervised_tokens})
    step += 1

# -----------------------------------------------------------------------------
step_log.close()
if device_type == "cuda":
    print0(f"Peak memory usage: {get_max_memory() / 1024 / 1024:.2f}MiB")
mean_tok_per_sec = total_tokens / total_training_time if total_training_time > 0 else None
mean_mfu = 100 * num_flops_per_token * mean_tok_per_sec / peak_flops if mean_tok_per_sec else None
if mean_tok_per_sec:
    print0(f"Mean throughput: {mean_tok_per_sec:,.0f} tok/s (padding included) | MFU {mean_mfu:.2f}% "
           f"| training time {format_seconds(total_training_time)}")
if not interrupted:
    get_report().log(section="Chat SFT", data=[
        user_config,
        {
            "Model tag": model_tag,
            "Source model": f"{source} {model_tag} step {source_meta['step']}",
            "Training rows": len(train_dataset),
            "Number of iterations": num_iterations,
            "DDP world size": ddp_world_size,
            "Precision": "bf16 autocast" if use_bf16 else "fp32",
        },
        {
            "Training loss": train_loss,
            "Validation loss": val_loss,
            **{name: metrics[key] for name, key in (("MMLU accuracy", "mmlu_acc"),
                                                     ("ARC-Easy accuracy", "arc_easy_acc")) if key in metrics},
            "Tokens per second": int(mean_tok_per_sec) if mean_tok_per_sec else None,
            "MFU %": f"{mean_mfu:.2f}%" if mean_tok_per_sec else None,
            "Total training time": f"{total_training_time / 60:.2f}m",
            **({"Peak memory usage": f"{get_max_memory() / 1024 / 1024:.2f}MiB"} if device_type == "cuda" else {}),
        },
    ])
wandb_run.finish()
compute_cleanup()
