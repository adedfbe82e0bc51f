"""
Evaluate a chat model (midtrained or fine-tuned) on the reference's six tasks and compute ChatCORE.
Multiple-choice tasks (ARC-Easy, ARC-Challenge, MMLU) are scored by the logits of the answer letters;
GSM8K, HumanEval and SpellingBee by sampling answers with the Engine (greedy by default) and checking
them (HumanEval runs the code against its tests in a sandbox, nanochat/execution.py).

    python -m scripts.chat_eval -i sft                          # all six tasks, ChatCORE
    python -m scripts.chat_eval -i mid -a "ARC-Easy|GSM8K" -x 100   # two tasks, 100 problems each
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_eval -- -i sft
    python -m scripts.chat_eval --help

Short flags as in the reference: -i source, -a task_name, -x max_problems, -b batch_size, -n num_samples,
-t temperature, -k top_k, -m max_new_tokens, -g model_tag, -s step. Logs the section
"Chat evaluation <source>" of the report, with the table.
"""

import sys
import time
from contextlib import nullcontext

import torch

from nanochat.common import compute_init, compute_cleanup, fail, print0, autodetect_device_type
from nanochat.configurator import configure
from nanochat.checkpoint_manager import load_model
from nanochat.decode import check_mode as check_decode_mode, job_mode
from nanochat.engine import Engine
from nanochat.chat_eval import ALL_TASKS, BASELINE_ACCURACY, run_chat_eval, centered_accuracy, chatcore
from nanochat.report import get_report
from tasks import load_eval_task

# -----------------------------------------------------------------------------
# Settings. Each can be overridden on the command line (--name=value or the short flags above).

# Model: which checkpoint to evaluate
source = ""  # -i: mid|sft|rl|base, the training phase whose checkpoint is evaluated (required)
model_tag = ""  # -g: checkpoint folder under the phase's folder ("" = the largest model)
step = -1  # -s: checkpoint step (-1 = the last one saved)
# Tasks: which, and how many problems
task_name = ""  # -a: tasks separated by | ("" = all six: ARC-Easy|ARC-Challenge|MMLU|GSM8K|HumanEval|SpellingBee)
max_problems = -1  # -x: problems per task (-1 = all); under torchrun split across ranks
batch_size = 8  # -b: prompts per forward pass for the multiple-choice tasks
# Sampling: for the generative tasks
num_samples = 1  # -n: completions per problem; a problem passes if any passes (pass@k)
temperature = 0.0  # -t: 0 = greedy
top_k = 50  # -k: sample among the k most likely tokens
max_new_tokens = 512  # -m: longest completion
# Runtime
device_type = ""  # cuda|cpu|mps ("" = autodetect)
dtype = "auto"  # auto|bfloat16|float32 (auto = bf16 autocast on CUDA, fp32 elsewhere)
decode_mode = ""  # eager|compile|cuda_graph for generative tasks ("" = cuda_graph on CUDA; CPU: compile for 256+ draws)
SHORT_FLAGS = {"-i": "source", "-a": "task_name", "-x": "max_problems", "-b": "batch_size", "-n": "num_samples",
               "-t": "temperature", "-k": "top_k", "-m": "max_new_tokens", "-g": "model_tag", "-s": "step",
               "-d": "dtype"}
argv = [f"--{SHORT_FLAGS[a]}" if a in SHORT_FLAGS else a for a in sys.argv[1:]]
user_config = configure(globals(), __file__, argv=argv)  # apply overrides; the final settings, logged with the results
# -----------------------------------------------------------------------------

task_names = task_name.split("|") if task_name else list(ALL_TASKS)
unknown = [t for t in task_names if t not in ALL_TASKS]
if not source:
    fail("say which model to evaluate: -i mid|sft|rl|base", every_rank_agrees=True)
if unknown:
    fail(f"unknown task(s) {', '.join(unknown)}: choose from {'|'.join(ALL_TASKS)}", every_rank_agrees=True)
if dtype not in ("auto", "bfloat16", "float32"):
    fail(f"--dtype must be one of auto|bfloat16|float32, got {dtype!r}", every_rank_agrees=True)
try:
    check_decode_mode(decode_mode)
except ValueError as e:
    fail(f"--decode-mode: {e}", every_rank_agrees=True)

device_type = device_type or autodetect_device_type()
ddp, ddp_rank, ddp_local_rank, ddp_world_size, device = compute_init(device_type)
use_bf16 = dtype == "bfloat16" or (dtype == "auto" and device_type == "cuda")
autocast_ctx = torch.amp.autocast(device_type=device_type, dtype=torch.bfloat16) if use_bf16 else nullcontext()
try:
    model, tokenizer, meta = load_model(source, device, phase="eval", model_tag=model_tag or None,
                                        step=step if step >= 0 else None)
except (FileNotFoundError, ValueError) as e:
    fail(str(e))
engine = Engine(model, tokenizer, decode_mode=decode_mode or None)

# Each task in turn (all ranks take part in each)
accuracies, problems, seconds = {}, {}, {}
for name in task_names:
    print0(f"{name}:")
    task = load_eval_task(name)
    if task.eval_type == "generative" and engine.decoder.mode is None:  # no --decode_mode given, not compiled yet
        task_problems = min(len(task), max_problems) if max_problems > 0 else len(task)
        completions = -(-task_problems // ddp_world_size) * num_samples  # on this rank
        if job_mode(device, completions) == "compile":  # compiled from here on: later tasks reuse the step
            print0(f"{completions} completions to draw per process: decoding compiled (decode.job_mode)")
            engine = Engine(model, tokenizer, decode_mode="compile")
    t0 = time.time()
    with autocast_ctx:
        accuracies[name], problems[name] = run_chat_eval(
            task, tokenizer, model, engine, batch_size=batch_size, num_samples=num_samples,
            max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
            max_problems=max_problems if max_problems > 0 else None)
    seconds[name] = time.time() - t0
    print0(f"{name} accuracy: {100 * accuracies[name]:.2f}% of {problems[name]} problems ({seconds[name]:.1f}s)")
chatcore_value = chatcore(accuracies)  # None unless all six tasks ran
if chatcore_value is not None:
    print0(f"ChatCORE: {chatcore_value:.4f}")

table = ["| Task | Accuracy | Centered | Random baseline | Problems | Time |", "|---|---|---|---|---|---|"]
for name in task_names:
    table.append(f"| {name} | {accuracies[name]:.4f} | {centered_accuracy(name, accuracies[name]):.4f} | "
                 f"{BASELINE_ACCURACY[name]:.2f} | {problems[name]} | {seconds[name]:.1f}s |")
if chatcore_value is not None:
    table.append(f"| **ChatCORE** | | **{chatcore_value:.4f}** | | | |")
print0("\n".join(table))
get_report().log(section=f"Chat evaluation {source}", data=[
    user_config,
    {"Model": f"{source} {model_tag or '(largest)'} step {meta['step']}"},
    "\n".join(table) + "\n",
    accuracies,  # the values the report card reads, by task name
    {"ChatCORE": chatcore_value} if chatcore_value is not None else {},
])
compute_cleanup()
