"""
Evaluating a chat model on tasks (tasks/*.py), as the reference's chat_eval does.

- categorical tasks (multiple choice: ARC, MMLU): one forward pass over a padded batch of prompts, then
  the answer is the letter, among the problem's letters, with the largest logit at the last position
  (the model is not asked to write the letter, only to rank the allowed ones);
- generative tasks (GSM8K, HumanEval, SpellingBee): sample completions with the Engine (temperature 0 =
  greedy by default; a problem passes when any of its num_samples completions passes: pass@k).

Under torchrun the problems are split across ranks and the counts summed, so every rank returns the
same accuracy. ChatCORE is the mean over the six tasks of the accuracy centered on the random
baseline, (acc - baseline) / (1 - baseline): 0 at chance, 1 at perfect, negative below chance.
"""

import torch
import torch.distributed as dist


ALL_TASKS = ["ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee"]
BASELINE_ACCURACY = {  # random guessing
    "ARC-Easy": 0.25,  # one of 4 letters
    "ARC-Challenge": 0.25,
    "MMLU": 0.25,
    "GSM8K": 0.0,  # open-ended answers
    "HumanEval": 0.0,
    "SpellingBee": 0.0,
}


def _rank_and_world_size():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _sum_over_ranks(device, *counts):
    if _rank_and_world_size()[1] == 1:
        return counts
    tensor = torch.tensor(counts, dtype=torch.long, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tuple(tensor.tolist())


@torch.no_grad()
def run_categorical_eval(task, tokenizer, model, batch_size, max_problems=None):
    """Accuracy of the highest-logit allowed letter, batch_size prompts per forward pass."""
    rank, world_size = _rank_and_world_size()
    device = model.get_device()
    pad_id = tokenizer.get_bos_token_id()  # any id: padded positions come after the answer position
    num_problems = len(task) if max_problems is None else min(len(task), max_problems)
    num_batches = -(-num_problems // batch_size)
    letter_ids = {}  # letter -> its single token id
    passed = total = 0
    for b in range(rank, num_batches, world_size):
        conversations = [task[i] for i in range(b * batch_size, min((b + 1) * batch_size, num_problems))]
        prompts = [tokenizer.render_for_completion(c) for c in conversations]
        width = max(len(p) for p in prompts)
        ids = torch.tensor([p + [pad_id] * (width - len(p)) for p in prompts], dtype=torch.long, device=device)
        answer_positions = torch.tensor([len(p) - 1 for p in prompts], device=device)
        logits = model(ids, positions=answer_positions)  # (B, 1, V): the lm_head at the answer positions only
        for row, (conversation, prompt) in enumerate(zip(conversations, prompts)):
            letters = conversation["letters"]
            for letter in letters:
                if letter not in letter_ids:
                    encoded = tokenizer.encode(letter)
                    if len(encoded) != 1:
                        raise ValueError(f"answer letter {letter!r} is {len(encoded)} tokens; it must be one")
                    letter_ids[letter] = encoded[0]
            choice_logits = logits[row, 0, [letter_ids[l] for l in letters]]
            predicted = letters[choice_logits.argmax().item()]
            passed += int(task.evaluate(conversation, predicted))
            total += 1
    passed, total = _sum_over_ranks(device, passed, total)
    return passed / max(total, 1), total


def run_generative_eval(task, tokenizer, engine, num_samples=1, max_new_tokens=512, temperature=0.0, top_k=50,
                        max_problems=None, progress=True):
    """pass@num_samples: a problem passes when any of its sampled completions passes task.evaluate."""
    rank, world_size = _rank_and_world_size()
    device = engine.model.get_device()
    num_problems = len(task) if max_problems is None else min(len(task), max_problems)
    passed = total = 0
    for i in range(rank, num_problems, world_size):
        conversation = task[i]
        prompt = tokenizer.render_for_completion(conversation)
        results, _ = engine.generate_batch(prompt, num_samples=num_samples, max_tokens=max_new_tokens,
                                           temperature=temperature, top_k=top_k)
        completions = [tokenizer.decode(tokens[len(prompt):]) for tokens in results]
        passed += int(any(task.evaluate(conversation, completion) for completion in completions))
        total += 1
        if progress and rank == 0:
            print(f"\r\033[K  {passed}/{total} passed on rank 0 ({100 * passed / total:.1f}%)", end="", flush=True)
    if progress and rank == 0 and total:
        print()
    passed, total = _sum_over_ranks(device, passed, total)
    return passed / max(total, 1), total


def run_chat_eval(task, tokenizer, model, engine, batch_size=8, num_samples=1, max_new_tokens=512,
                  temperature=0.0, top_k=50, max_problems=None):
    """(accuracy, number of problems) of `task` (a tasks/ Task; tasks.load_eval_task gives them by name), by its eval_type."""
    if task.eval_type == "categorical":
        return run_categorical_eval(task, tokenizer, model, batch_size, max_problems=max_problems)
    if task.eval_type == "generative":
        return run_generative_eval(task, tokenizer, engine, num_samples, max_new_tokens, temperature, top_k,
                                   max_problems=max_problems)
    raise ValueError(f"task eval_type must be 'categorical' or 'generative', got {task.eval_type!r}")


def centered_accuracy(name, accuracy):
    baseline = BASELINE_ACCURACY[name]
    return (accuracy - baseline) / (1.0 - baseline)


def chatcore(accuracies):
    """ChatCORE of {task name: accuracy}, or None unless all six tasks are there (as in the reference)."""
    if any(name not in accuracies for name in ALL_TASKS):
        return None
    return sum(centered_accuracy(name, accuracies[name]) for name in ALL_TASKS) / len(ALL_TASKS)
