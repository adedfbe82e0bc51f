"""
Reinforcement learning on GSM8K, the last stage of the pipeline: the SFT model samples answers to the train
problems (with its calculator), each answer is rewarded 1 if its final number is right, and the weights move
towards the answers that beat the problem's average (nanochat/rl.py: on-policy policy gradient, as the
reference's). pass@k on the test problems is measured every eval_every steps.

    python -m scripts.chat_rl -i sft                                          # the reference's settings
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_rl -- --run=d20  # the speedrun's optional stage
    python -m scripts.chat_rl --device_type=cpu --num_iterations=4 --examples_per_step=2 --num_samples=4 \\
        --device_batch_size=4 --max_new_tokens=32 --eval_examples=8           # a few toy steps on a laptop
    python -m scripts.chat_rl --help                                          # every setting, explained

Starts from <base>/chatsft_checkpoints/<model_tag>/ (-i mid: mid_checkpoints); writes
<base>/chatrl_checkpoints/<model_tag>/ with a log.jsonl, loadable with `-i rl` by chat_eval, chat_cli and
chat_web. Ctrl-C saves and prints the command to continue; `--resume_from_step=S` continues exactly.
"""

import os
import sys
import time
from contextlib import nullcontext

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # less fragmentation on GPUs

import torch
import torch.distributed as dist

from nanochat import hardware
from nanochat.checkpoint_manager import (CHECKPOINT_FOLDERS, build_model, find_largest_model,
                                         load_model, save_checkpoint)
from nanochat.common import (DummyWandb, autodetect_device_type, compute_cleanup, compute_init, fail,
                             format_seconds, get_base_dir, print0)
from nanochat.configurator import configure
from nanochat.decode import check_mode as check_decode_mode, choose_decode_dtype
from nanochat.engine import Engine
from nanochat.report import get_report
from nanochat.rl import (COMPILED_ROW_MULTIPLE, pass_at_k, policy, policy_gradient_loss, rollouts, sample_outcomes,
                         zero_missing_grads)
from nanochat.training import (StepLog, StopRequest, warn_changed_settings, saved_machine_choices, machine_choices,
                               use_bf16_autocast, use_torch_compile, finetuning_optimizers, reuse_thread_count,
                               stop_on_nonfinite_loss, set_learning_rates)
from tasks.gsm8k import GSM8K

# -----------------------------------------------------------------------------
# Settings. Each can be overridden on the command line (--name=value, or -i for source); --help prints them.

# Runtime: where the run happens and how it is logged
run = "dummy"  # wandb run name ("dummy" = no wandb logging)
device_type = ""  # cuda|cpu|mps ("" = autodetect: CUDA > MPS > CPU)
dtype = "auto"  # auto|bfloat16|float32: training under bf16 autocast, and the rollouts' decode dtype (auto = measured)
decode_mode = ""  # rollouts: eager|compile|cuda_graph ("" = cuda_graph on CUDA; on CPU compile if training is)
compile = "auto"  # torch.compile the training passes: auto|true|false (auto = on CUDA, and on CPU for long runs)
# Model: the checkpoint RL starts from, and where its own go
source = "sft"  # -i: sft|mid, the phase whose checkpoint is improved
model_tag = ""  # <source folder>/<tag> to start from and chatrl_checkpoints/<tag> to write ("" = the largest)
source_step = -1  # step of the source checkpoint (-1 = its last)
# Horizon: epochs of GSM8K train unless given
num_epochs = 1  # passes over the GSM8K train problems
num_iterations = -1  # explicit number of steps (-1 = from num_epochs); the learning rate reaches 0 at the end
# Rollouts: what each step samples (the reference's)
examples_per_step = 16  # problems per step, over all ranks
num_samples = 16  # completions sampled per problem; the advantage is a completion's reward minus their mean
device_batch_size = 8  # completions per sampling batch and per forward/backward pass (memory)
max_new_tokens = 256  # longest completion
temperature = 1.0  # sampling temperature of the rollouts and of the pass@k evaluation
top_k = 50  # sample among the k most likely tokens
# Optimisation: the model's own optimizers, at a fraction of the base rates, decaying linearly to 0
embedding_lr = 0.2  # AdamW learning rate of the token embedding
unembedding_lr = 0.004  # AdamW learning rate of the lm_head
matrix_lr = 0.02  # Muon learning rate of the transformer's matrices
weight_decay = 0.0  # AdamW weight decay of the embedding and lm_head
init_lr_frac = 0.05  # every learning rate above is scaled by this at the start
resume_from_step = -1  # continue this RL run from its checkpoint of this step (-1 = start from the source model)
# Evaluation and checkpoints: any value <= 0 turns it off
eval_every = 60  # steps between pass@k evaluations on GSM8K test (and at the last step)
eval_examples = 400  # test problems per evaluation, over all ranks (device_batch_size samples each: pass@1..k)
save_every = 60  # steps between checkpoints (and at the last step)
SHORT_FLAGS = {"-i": "source", "-g": "model_tag"}
argv = [f"--{SHORT_FLAGS[a]}" if a in SHORT_FLAGS else a for a in sys.argv[1:]]
user_config = configure(globals(), __file__, argv=argv)  # apply overrides; the final settings, logged with the run
# -----------------------------------------------------------------------------

for name, allowed in (("dtype", ("auto", "bfloat16", "float32")), ("compile", ("auto", "true", "false"))):
    if globals()[name] not in allowed:
        fail(f"--{name} must be one of {'|'.join(allowed)}, got {globals()[name]!r}", every_rank_agrees=True)
if source not in ("sft", "mid"):
    fail(f"--source (-i) must be sft or mid, got {source!r}", every_rank_agrees=True)
try:
    check_decode_mode(decode_mode)
except ValueError as e:
    fail(f"--decode-mode: {e}", every_rank_agrees=True)

# Compute: device, distributed group
device_type = device_type or autodetect_device_type()
ddp, ddp_rank, ddp_local_rank, ddp_world_size, device = compute_init(device_type)
master_process = ddp_rank == 0
synchronize = torch.cuda.synchronize if device_type == "cuda" else (lambda: None)

# Batch: problems split over ranks, samples split into passes
if examples_per_step <= 0 or examples_per_step % ddp_world_size != 0:
    lower = max(ddp_world_size, examples_per_step // ddp_world_size * ddp_world_size)
    fail(f"examples_per_step={examples_per_step} is not a multiple of the {ddp_world_size} ranks: use {lower} or "
         f"{lower + ddp_world_size}", every_rank_agrees=True)
if device_batch_size <= 0 or num_samples <= 0 or num_samples % device_batch_size != 0:
    fail(f"num_samples={num_samples} is not a multiple of device_batch_size={device_batch_size}: use num_samples="
         f"{max(1, num_samples // max(device_batch_size, 1)) * max(device_batch_size, 1)} or a device_batch_size "
         f"that divides it", every_rank_agrees=True)
examples_per_rank = examples_per_step // ddp_world_size
passes_per_example = num_samples // device_batch_size

# Model: the source checkpoint, or the RL checkpoint we resume from
base_dir = get_base_dir()
resuming = resume_from_step >= 0
try:
    if not resuming:
        model, tokenizer, source_meta = load_model(source, device, phase="train", model_tag=model_tag or None,
                                                   step=source_step if source_step >= 0 else None)
        model_tag = model_tag or find_largest_model(os.path.join(base_dir, CHECKPOINT_FOLDERS[source]))
        meta_data = None
    else:
        model_tag = model_tag or find_largest_model(os.path.join(base_dir, CHECKPOINT_FOLDERS["rl"]))
        checkpoint_dir = os.path.join(base_dir, CHECKPOINT_FOLDERS["rl"], model_tag)
        print0(f"Resuming from step {resume_from_step} of {checkpoint_dir}")
        model, tokenizer, meta_data = build_model(checkpoint_dir, resume_from_step, device, phase="train")
        source_meta = {"step": meta_data["source_step"]}
        harmless = {"run", "resume_from_step", "eval_every", "eval_examples", "save_every", "model_tag"}
        warn_changed_settings(meta_data["user_config"], user_config, harmless)
except (FileNotFoundError, ValueError) as e:
    fail(str(e))
checkpoint_dir = os.path.join(base_dir, CHECKPOINT_FOLDERS["rl"], model_tag)
model_config_kwargs = dict(vars(model.config))
num_flops_per_token = model.estimate_flops()
print0(f"Model: {source} {model_tag} step {source_meta['step']}, {sum(p.numel() for p in model.parameters()):,} "
       "parameters")

# Problems: GSM8K train for the rollouts, test for pass@k. Rank r takes train problems r, r + world, ...
try:
    train_task, val_task = GSM8K(subset="main", split="train"), GSM8K(subset="main", split="test")
except (FileNotFoundError, ValueError, OSError) as e:
    fail(str(e))
rank_problems = range(ddp_rank, len(train_task), ddp_world_size)
if num_iterations <= 0:
    num_iterations = (len(train_task) // examples_per_step) * num_epochs
if num_iterations <= 0:
    fail(f"GSM8K train ({len(train_task)} problems) is smaller than one step of {examples_per_step}",
         every_rank_agrees=True)
print0(f"Rollouts per step: {examples_per_step} problems x {num_samples} samples = {examples_per_step * num_samples} "
       f"completions ({examples_per_rank} problems per rank, sampled and trained {device_batch_size} at a time)")
print0(f"GSM8K: {len(train_task):,} train problems, {len(val_task):,} test | steps: {num_iterations:,}")

def problem_at(step, i):
    """The train problem of this rank's i-th rollout at step: fixed by the step, so a resumed run takes the same."""
    return rank_problems[(step * examples_per_rank + i) % len(rank_problems)]

# Precision and threads (a resumed run makes the choices it saved)
saved_choices = saved_machine_choices(meta_data)
reuse_thread_count(saved_choices, device)
use_bf16 = use_bf16_autocast(dtype, saved_choices, device)
autocast_ctx = torch.amp.autocast(device_type=device_type, dtype=torch.bfloat16) if use_bf16 else nullcontext()
if dtype != "auto":
    rollout_dtype = getattr(torch, dtype)
elif "rollouts" in saved_choices:
    rollout_dtype = getattr(torch, saved_choices["rollouts"])
else:
    rollout_dtype = choose_decode_dtype(device)
peak_flops = hardware.peak_flops(device, dtype=torch.bfloat16 if use_bf16 else torch.float32) * ddp_world_size
# Compiled, the rows after the prompt are padded to a multiple of 32 tokens: one compile per length, up to
# ceil(max_new_tokens / 32) of them, each (the prompt's length symbolic) as long as two plain compiles (35-45 s at
# depth 4 on CPU), paid back once eager training would take 30 s longer per plain compile.
eager_training_seconds = (num_flops_per_token * num_iterations * examples_per_step * num_samples * max_new_tokens
                          / (0.2 * peak_flops))
use_compile = use_torch_compile(compile, saved_choices, device, eager_training_seconds,
                                shapes=2 * -(-max_new_tokens // COMPILED_ROW_MULTIPLE))
token_losses = policy(model, compile=use_compile)
row_multiple = COMPILED_ROW_MULTIPLE if use_compile else 1
# Rollouts on torch's thread count, not the faster of two timed ones: a timing must not change what is sampled.
# On CPU a long run's are compiled too (seconds, once per batch size), with live weights: the compiled step reads
# the weights as each step trains them (1.6x eager's tok/s at batch 8, dev/bench_rl.py).
rollout_mode = decode_mode or ("compile" if device.type == "cpu" and use_compile else None)
engine = Engine(model, tokenizer, dtype=rollout_dtype, decode_mode=rollout_mode, timed_threads=False,
                live_weights=True)
print0(f"Precision: training {'bf16 autocast' if use_bf16 else 'fp32'}, rollouts {str(rollout_dtype)[6:]} "
       f"({rollout_mode or 'default'} decoding) | "
       f"torch.compile: {use_compile} | CPU threads: {torch.get_num_threads()} | peak FLOP/s for MFU: {peak_flops:.3e}")

# Optimizers at init_lr_frac of the base rates, decaying linearly to 0 over the run
optimizers = finetuning_optimizers(model, init_lr_frac, saved_choices,
                                   resume=(checkpoint_dir, resume_from_step, device, ddp_rank) if resuming else None,
                                   unembedding_lr=unembedding_lr, embedding_lr=embedding_lr, matrix_lr=matrix_lr,
                                   weight_decay=weight_decay)
adamw_optimizer, muon_optimizer = optimizers

def get_lr_multiplier(it):
    return 1.0 - it / num_iterations

# Loop state: everything besides weights and optimizer that a resumed run continues with
if not resuming:
    step, pass_k, reward, total_time, rollout_time, training_time = 0, None, None, 0.0, 0.0, 0.0
    generated_tokens, trained_tokens = 0, 0
else:
    loop_state = meta_data["loop_state"]
    step, pass_k, reward = meta_data["step"], meta_data.get("pass_at_k"), loop_state["reward"]
    total_time, rollout_time, training_time = (loop_state[k] for k in ("total_time", "rollout_time", "training_time"))
    generated_tokens, trained_tokens = loop_state["generated_tokens"], loop_state["trained_tokens"]

def save_current_step(with_optimizer=True):
    """Checkpoint of the current step: every rank's optimizer shard, rank 0's model and meta."""
    meta = {
        "step": step,
        "pass_at_k": pass_k,
        "model_config": model_config_kwargs,
        "user_config": user_config,
        "source": source,
        "source_step": source_meta["step"],
        "loop_state": {
            "reward": reward, "total_time": total_time, "rollout_time": rollout_time, "training_time": training_time,
            "generated_tokens": generated_tokens, "trained_tokens": trained_tokens,
            "machine_choices": {**machine_choices(use_bf16, muon_optimizer, use_compile),
                                "rollouts": str(rollout_dtype).removeprefix("torch.")},
        },
    }
    optimizer_data = [opt.state_dict() for opt in optimizers] if with_optimizer else None
    save_checkpoint(checkpoint_dir, step, model.state_dict(), optimizer_data, meta, rank=ddp_rank,
                    world_size=ddp_world_size)

def sum_over_ranks(values):
    """Sums of a list of numbers over the ranks (the list itself on one process)."""
    if not ddp:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()

step_log = StepLog(os.path.join(checkpoint_dir, "log.jsonl"), resume_step=step if resuming else None,
                   enabled=master_process)
if run != "dummy" and master_process:
    import wandb
    wandb_run = wandb.init(project="nanochat-rl", name=run, config=user_config, dir=os.environ.get("WANDB_DIR", base_dir))
else:
    wandb_run = DummyWandb()
stop = StopRequest()  # Ctrl-C / SIGTERM: finish the step, save, exit

# -----------------------------------------------------------------------------
# Training loop: the pass after the last step only evaluates and saves
first_step, loop_start = step, time.time()
interrupted = stop_now = False
while True:
    last_step = step == num_iterations
    if stop_now and not last_step:
        print0(f"Interrupted (Ctrl-C or SIGTERM): saving step {step} and exiting")
        if step != resume_from_step:
            save_current_step()
        print0(f"Stopped at step {step}. Continue with the same command plus --resume_from_step={step}")
        interrupted = True
        break

    # pass@k on GSM8K test: device_batch_size samples per problem at the rollouts' temperature
    if eval_every > 0 and (last_step or step % eval_every == 0):
        t0 = time.time()
        problems = range(ddp_rank, min(eval_examples, len(val_task)), ddp_world_size)
        with autocast_ctx:
            outcomes = sample_outcomes(engine, tokenizer, val_task, problems, device_batch_size, max_new_tokens,
                                       temperature=temperature, top_k=top_k)
        *counts, num_problems = sum_over_ranks([*pass_at_k(outcomes, device_batch_size), len(outcomes)])
        pass_k = {f"pass@{k}": count / max(num_problems, 1) for k, count in enumerate(counts, start=1)}
        print0(f"Step {step:05d} | GSM8K test, {int(num_problems)} problems ({time.time() - t0:.0f}s) | "
               + ", ".join(f"{name}: {value:.4f}" for name, value in pass_k.items()))
        step_log.log({"step": step, **pass_k})
        wandb_run.log({"step": step, **pass_k})

    if step != resume_from_step and (last_step or (save_every > 0 and step > 0 and step % save_every == 0)):
        save_current_step(with_optimizer=not last_step)  # the final model is for chatting: no optimizer
    if last_step:
        break

    # ---- one step: rollouts with the current weights, then one update from all of them ----
    synchronize()
    t0 = time.time()
    batches = [rollouts(engine, tokenizer, train_task, problem_at(step, i), step, num_samples, device_batch_size,
                        max_new_tokens, temperature=temperature, top_k=top_k, pad_multiple=row_multiple)
               for i in range(examples_per_rank)]
    synchronize()
    t1 = time.time()
    loss_sum = torch.zeros((), device=device)
    rows_tokens = 0  # of the passes trained, without the padding to row_multiple
    for batch in batches:
        for b0 in range(0, num_samples, device_batch_size):
            inputs, targets = batch.inputs[b0:b0 + device_batch_size], batch.targets[b0:b0 + device_batch_size]
            advantages = batch.advantages[b0:b0 + device_batch_size]
            if not advantages.any():  # each reward is the problem's mean (0/1 rewards: all equal): zero gradient
                continue
            # normalised by this pass's valid tokens, the passes and the problems, as the reference does
            normalizer = (targets >= 0).sum().clamp(min=1) * passes_per_example * examples_per_rank
            with autocast_ctx:
                loss = policy_gradient_loss(token_losses, batch.prefix, inputs, targets, advantages, normalizer)
            loss.backward()
            loss_sum += loss.detach()
            rows_tokens += batch.row_tokens // passes_per_example
    zero_missing_grads(model)  # a step that trained no pass still steps (momentum), as the reference's does
    # rank sums: reward, completion tokens, samples, loss, non-finite flags, stop requests, trained tokens
    sums = sum_over_ranks([sum(b.rewards.sum().item() for b in batches), sum(b.completion_tokens for b in batches),
                           examples_per_rank * num_samples, loss_sum.item(), float(not torch.isfinite(loss_sum)),
                           float(stop.requested), rows_tokens])
    reward_sum, completion_sum, samples, loss_total, any_nonfinite, any_stop, step_trained_tokens = sums
    stop_now = any_stop > 0
    if any_nonfinite > 0:
        stop_on_nonfinite_loss("policy-gradient loss", step, checkpoint_dir)
    lrm = get_lr_multiplier(step)
    set_learning_rates(optimizers, lrm)
    for opt in optimizers:
        opt.step()
    model.zero_grad(set_to_none=True)
    synchronize()
    t2 = time.time()
    # ---------------------------------

    reward, loss_mean = reward_sum / samples, loss_total / ddp_world_size  # each rank's loss is over its problems
    rollout_time += t1 - t0
    training_time += t2 - t1
    total_time += t2 - t0
    generated_tokens += int(completion_sum)
    trained_tokens += int(step_trained_tokens)
    rollout_tok_per_sec = completion_sum / (t1 - t0)
    train_tok_per_sec = step_trained_tokens / (t2 - t1)
    done_steps = step + 1 - first_step
    eta = (num_iterations - step - 1) * (time.time() - loop_start) / done_steps if done_steps else 0.0
    print0(f"step {step:05d}/{num_iterations:05d} | reward: {reward:.4f} | completion: {completion_sum / samples:.1f} "
           f"tokens | rollouts: {rollout_tok_per_sec:,.0f} tok/s | training: {train_tok_per_sec:,.0f} tok/s | "
           f"lrm: {lrm:.4f} | dt: {t2 - t0:.1f}s | ETA: {format_seconds(eta)}")
    record = {"step": step, "reward": reward, "loss": loss_mean, "completion_tokens": completion_sum / samples,
              "rollout_tok_per_sec": rollout_tok_per_sec, "train_tok_per_sec": train_tok_per_sec, "lr_mult": lrm,
              "dt": t2 - t0, "total_time": total_time}
    step_log.log(record)
    wandb_run.log(record)
    step += 1

# -----------------------------------------------------------------------------
step_log.close()
if total_time > 0:
    print0(f"Rollouts: {generated_tokens / rollout_time:,.0f} tok/s | training: {trained_tokens / training_time:,.0f} "
           f"tok/s | total {format_seconds(total_time)}")
if not interrupted:
    get_report().log(section="Chat RL", data=[
        user_config,
        {
            "Model tag": model_tag,
            "Source model": f"{source} {model_tag} step {source_meta['step']}",
            "Number of iterations": num_iterations,
            "DDP world size": ddp_world_size,
            "Precision": f"training {'bf16 autocast' if use_bf16 else 'fp32'}, rollouts {str(rollout_dtype)[6:]}",
        },
        {
            "Final mean reward": reward,
            **(pass_k or {}),
            "Rollout tokens per second": int(generated_tokens / rollout_time) if rollout_time else None,
            "Training tokens per second": int(trained_tokens / training_time) if training_time else None,
            "Total RL time": f"{total_time / 60:.2f}m",
        },
    ])
wandb_run.finish()
compute_cleanup()
