"""
The CORE metric of the DCLM paper (https://arxiv.org/abs/2406.11794): in-context-learning tasks
scored by comparing the model's loss on candidate continuations, no generation needed.

Three kinds of task, all read from the eval bundle (core.yaml + eval_data/*.jsonl):
- multiple_choice: one question ("query"), several answers ("choices"); the answer whose tokens
  get the lowest mean loss wins.
- schema: several contexts ("context_options"), one shared "continuation"; the context under
  which the continuation gets the lowest mean loss wins.
- language_modeling: one "context" and its "continuation"; correct only if greedy (argmax)
  prediction reproduces every continuation token.
Each prompt is preceded by num_fewshot solved examples of the same task, separated by blank lines.

Per task: accuracy, then centered = (accuracy - b) / (1 - b) with b the random-guess baseline
(given in percent in eval_meta_data.csv), so 0 means chance and 1 means perfect. CORE is the
mean centered score over tasks.

The prompt text, few-shot sampling, tokenisation, scoring slices and data order follow the
reference nanochat (f37d45c) exactly, so numbers are comparable with published ones.
"""

import csv
import json
import os
import random
import shutil
import tempfile
import time
import zipfile
import zlib
from contextlib import contextmanager

import torch
import torch.distributed as dist
from filelock import FileLock

from nanochat.common import atomic_write, download_file_with_lock, format_seconds, get_base_dir, print0
from nanochat.integrity import MANIFEST, DamagedFileError, record_problem

TASK_TYPES = ("multiple_choice", "schema", "language_modeling")

# -----------------------------------------------------------------------------
# Prompt text. A solved few-shot example is "<context><delimiter><answer>" followed by a blank line.


def _fewshot_prefix(solved_examples, continuation_delimiter):
    """solved_examples: list of (context, answer) strings."""
    return "".join(f"{context}{continuation_delimiter}{answer}\n\n" for context, answer in solved_examples)


def render_prompts_mc(item, continuation_delimiter, fewshot_examples=()):
    """One full prompt per choice; they share everything up to the answer."""
    solved = [(ex["query"], ex["choices"][ex["gold"]]) for ex in fewshot_examples]
    prefix = _fewshot_prefix(solved, continuation_delimiter)
    return [f"{prefix}{item['query']}{continuation_delimiter}{choice}" for choice in item["choices"]]


def render_prompts_schema(item, continuation_delimiter, fewshot_examples=()):
    """One full prompt per context option; they share the ending (the continuation)."""
    solved = [(ex["context_options"][ex["gold"]], ex["continuation"]) for ex in fewshot_examples]
    prefix = _fewshot_prefix(solved, continuation_delimiter)
    return [f"{prefix}{context}{continuation_delimiter}{item['continuation']}" for context in item["context_options"]]


def render_prompts_lm(item, continuation_delimiter, fewshot_examples=()):
    """
    Two prompts: without and with the continuation. Contexts are stripped (some datasets carry
    trailing spaces), and so is the whole prompt without the continuation: otherwise a trailing
    space would merge into the continuation's first token in the second prompt, and the first
    prompt's tokens would no longer be a prefix of the second's.
    """
    solved = [(str(ex["context"]).strip(), ex["continuation"]) for ex in fewshot_examples]
    prefix = _fewshot_prefix(solved, continuation_delimiter)
    question = f"{prefix}{str(item['context']).strip()}{continuation_delimiter}"
    return [question.strip(), f"{question}{item['continuation']}"]


# -----------------------------------------------------------------------------
# Tokens: which positions of each sequence hold the part being scored


def common_prefix_length(sequences):
    shortest = min(len(s) for s in sequences)
    for i in range(shortest):
        if any(s[i] != sequences[0][i] for s in sequences):
            return i
    return shortest


def common_suffix_length(sequences):
    return common_prefix_length([s[::-1] for s in sequences])


def tokenize_prompts(tokenizer, task_type, prompts):
    """
    BOS + prompt tokens, and for each sequence the [start, end) span of tokens being scored.
    mc: the span starts where the choices' tokens first differ (common token prefix).
    schema: the span is the common token suffix (the shared continuation).
    lm: only the prompt with the continuation is kept; the span is what the continuation added.
    """
    tokens = tokenizer(prompts, prepend=tokenizer.get_bos_token_id())
    if task_type == "multiple_choice":
        start = common_prefix_length(tokens)
        return tokens, [start] * len(tokens), [len(t) for t in tokens]
    if task_type == "schema":
        suffix = common_suffix_length(tokens)
        return tokens, [len(t) - suffix for t in tokens], [len(t) for t in tokens]
    if task_type == "language_modeling":
        without, with_continuation = tokens
        if not (len(without) < len(with_continuation) and with_continuation[: len(without)] == without):
            raise ValueError(
                "language_modeling prompt: the tokens of the prompt without the continuation are not a strict "
                f"prefix of the prompt with it (prompt: {prompts[0][-80:]!r}); check the tokenizer and the data"
            )
        return [with_continuation], [len(without)], [len(with_continuation)]
    raise ValueError(f"unknown task type {task_type!r}; expected one of {TASK_TYPES}")


def crop_left(tokens, starts, ends, max_len):
    """Keep the last max_len tokens of each too-long sequence, shifting its scored span to match."""
    cropped = ([], [], [])
    for seq, start, end in zip(tokens, starts, ends):
        drop = max(0, len(seq) - max_len)
        if start - drop < 1:
            raise ValueError(
                f"a continuation of {end - start} tokens does not fit after cropping the prompt to {max_len} tokens "
                "(at least one context token must remain before it)"
            )
        cropped[0].append(seq[drop:])
        cropped[1].append(start - drop)
        cropped[2].append(end - drop)
    return cropped


def pad_right(tokens, pad_id):
    """(B, T) long tensor of the sequences, padded on the right to the longest."""
    batch = torch.full((len(tokens), max(len(t) for t in tokens)), pad_id, dtype=torch.long)
    for row, seq in enumerate(tokens):
        batch[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
    return batch


# -----------------------------------------------------------------------------
# One example, one task


def sample_fewshot(data, idx, num_fewshot):
    """num_fewshot other examples of the task, the same ones for example idx on every run and rank."""
    if num_fewshot <= 0:
        return []
    num_others = len(data) - 1
    if num_fewshot > num_others:
        raise ValueError(f"task asks for {num_fewshot} few-shot examples but only {num_others} other examples exist")
    # Sampling positions in the list of the other examples, without building that list: random.sample
    # only looks at the length and indexes, so this picks the same examples as sampling the list would.
    positions = random.Random(1234 + idx).sample(range(num_others), num_fewshot)
    return [data[p if p < idx else p + 1] for p in positions]


RENDERERS = {"multiple_choice": render_prompts_mc, "schema": render_prompts_schema,
             "language_modeling": render_prompts_lm}


def prepare_example(idx, model, tokenizer, data, task_meta):
    """The token sequences of data[idx] (one per choice, context option, or the one lm sequence) and the
    [start, end) span scored in each."""
    task_type = task_meta["task_type"]
    if task_type not in RENDERERS:
        raise ValueError(f"unknown task type {task_type!r}; expected one of {TASK_TYPES}")
    fewshot = sample_fewshot(data, idx, task_meta["num_fewshot"])
    prompts = RENDERERS[task_type](data[idx], task_meta["continuation_delimiter"], fewshot)
    tokens, starts, ends = tokenize_prompts(tokenizer, task_type, prompts)
    # Models with a hard context limit expose max_seq_len. nanochat's GPT does not (as in the reference,
    # it takes prompts longer than its training length); only a prompt beyond its rotary table, which
    # it could not run at all, is cropped to fit.
    max_len = getattr(model, "max_seq_len", None) or getattr(model, "rotary_seq_len", None)
    if max_len is not None:
        tokens, starts, ends = crop_left(tokens, starts, ends, max_len)
    return tokens, starts, ends


@contextmanager
def logits_only_at(model, rows, positions):
    """
    Within this block a GPT's forward returns the logits of positions (rows[i], positions[i]) only, (N, V):
    a hook hands its unembedding (lm_head, the largest matmul of a small model) just those rows, so it
    and the softcap after it skip every unscored position. Yields False, changing nothing, for a model
    without an lm_head module.
    """
    lm_head = getattr(model, "lm_head", None)
    if not isinstance(lm_head, torch.nn.Module):
        yield False
        return
    handle = lm_head.register_forward_pre_hook(lambda module, args: (args[0][rows, positions],))
    try:
        yield True
    finally:
        handle.remove()


@torch.no_grad()
def evaluate_batch(model, tokenizer, data, device, task_meta, examples):
    """
    Whether the model gets each example right, all in one forward pass: examples is a list of
    (idx, (tokens, starts, ends)); the sequences of all of them are padded on the right into one batch.
    Padding changes nothing before it (the model is causal) and padded positions are never scored.
    The loss (or argmax prediction) of a position is computed from its logits alone, so picking out the
    scored positions first gives the numbers a cross-entropy over every position would, for less work.
    """
    rows = [seq for _, (tokens, _, _) in examples for seq in tokens]
    input_ids = pad_right(rows, tokenizer.get_bos_token_id()).to(device)  # BOS as padding
    # every scored position, span after span: row r, positions start-1 .. end-2 predict tokens start .. end-1
    spans = [(row, start, end) for row, (start, end) in
             enumerate((s, e) for _, (_, starts, ends) in examples for s, e in zip(starts, ends))]
    at_row = torch.cat([torch.full((end - start,), row) for row, start, end in spans]).to(device)
    at_pos = torch.cat([torch.arange(start - 1, end - 1) for _, start, end in spans]).to(device)
    with logits_only_at(model, at_row, at_pos) as picked:
        logits = model(input_ids)  # (N, V) if picked, else (B, T, V)
    scored = logits if picked else logits[at_row, at_pos]  # (N, V)
    targets = input_ids[at_row, at_pos + 1]  # (N,)
    lengths = [end - start for _, start, end in spans]
    if task_meta["task_type"] == "language_modeling":  # right only if greedy prediction hits every token
        return torch.stack([hit.all() for hit in (scored.argmax(dim=-1) == targets).split(lengths)]).tolist()
    losses = torch.nn.functional.cross_entropy(scored, targets, reduction="none")
    mean_losses = torch.stack([span.mean() for span in losses.split(lengths)]).tolist()
    results, row = [], 0
    for idx, (tokens, _, _) in examples:  # lowest mean loss wins (the first lowest on ties, Python's min)
        choices = mean_losses[row:row + len(tokens)]
        results.append(min(range(len(choices)), key=lambda c: choices[c]) == data[idx]["gold"])
        row += len(tokens)
    return results


def shares_a_long_prefix(model, tokens, starts, ends, min_saved_tokens=256):
    """Whether shared_prefix_choice pays for this example: a GPT (it needs the KV cache), a prefix common to all
    sequences and at least one token after it in each, and min_saved_tokens fewer tokens to run than with the
    whole sequences (one forward pass costs about a few hundred tokens of a small model's compute on a CPU)."""
    from nanochat.gpt import GPT

    start = starts[0]
    return (isinstance(model, GPT) and all(s == start for s in starts) and all(end > start for end in ends)
            and all(seq[:start] == tokens[0][:start] for seq in tokens)
            and start * (len(tokens) - 1) >= min_saved_tokens)


@torch.no_grad()
def shared_prefix_choice(model, tokenizer, device, tokens, start, ends):
    """
    The choice with the lowest mean loss of a multiple-choice example whose sequences share their first
    `start` tokens (the few-shot examples and the question): those run once, batch 1, into a KV cache,
    then every choice's continuation runs on top of it in one batch. The first scored token of each
    choice is predicted by the last shared position.
    """
    from nanochat.engine import KVCache  # only GPTs take this path

    config = model.config
    shape = dict(num_heads=config.n_kv_head, seq_len=max(len(seq) for seq in tokens),
                 head_dim=config.n_embd // config.n_head, num_layers=config.n_layer)
    prefix_cache = KVCache(1, **shape)
    last = torch.tensor([0], device=device), torch.tensor([start - 1], device=device)
    with logits_only_at(model, *last) as picked:
        logits = model(torch.tensor([tokens[0][:start]], device=device), kv_cache=prefix_cache)
    first = (logits if picked else logits[last])[0]  # (V,): predicts the first token of every continuation
    cache = KVCache(len(tokens), **shape)
    cache.prefill(prefix_cache)
    continuations = pad_right([seq[start:] for seq in tokens], tokenizer.get_bos_token_id()).to(device)  # (n, L)
    # row r: its first token is scored from `first`, tokens start+1 .. end-1 from its positions 0 .. end-start-2
    at_row = torch.cat([torch.full((end - start - 1,), row) for row, end in enumerate(ends)]).to(device)
    at_pos = torch.cat([torch.arange(end - start - 1) for end in ends]).to(device)
    with logits_only_at(model, at_row, at_pos) as picked:
        logits = model(continuations, kv_cache=cache)
    rest = logits if picked else logits[at_row, at_pos]  # (N, V)
    mean_losses = []
    offset = 0
    for row, end in enumerate(ends):
        n = end - start - 1
        scored = torch.cat([first[None], rest[offset:offset + n]])  # (end - start, V)
        targets = torch.tensor(tokens[row][start:end], device=device)
        mean_losses.append(torch.nn.functional.cross_entropy(scored, targets, reduction="none").mean())
        offset += n
    mean_losses = torch.stack(mean_losses).tolist()
    return min(range(len(mean_losses)), key=lambda c: mean_losses[c])  # the first lowest on ties, as min does


def evaluate_example(idx, model, tokenizer, data, device, task_meta):
    """True if the model gets data[idx] right (one example in its own forward pass, as the reference does)."""
    example = (idx, prepare_example(idx, model, tokenizer, data, task_meta))
    return evaluate_batch(model, tokenizer, data, device, task_meta, [example])[0]


class TaskProgress:
    """For a long task: how far it has got, by tokens evaluated, every `every` seconds (rank 0), with an ETA."""

    def __init__(self, name, total_tokens, every):
        self.name, self.total, self.every = name, total_tokens, every
        self.done = 0
        self.start = self.last = time.time()

    def advance(self, tokens):
        self.done += tokens
        now = time.time()
        if self.name and now - self.last >= self.every and self.done < self.total:
            self.last = now
            eta = (now - self.start) / self.done * (self.total - self.done)
            print0(f"      {self.name}: {100 * self.done / self.total:.0f}% of its tokens after "
                   f"{format_seconds(now - self.start)}, eta {format_seconds(eta)}")


def evaluate_task(model, tokenizer, data, device, task_meta, batch_tokens=8192, name="", progress_every=30.0):
    """
    Accuracy over the examples of one task. task_meta: task_type, num_fewshot, continuation_delimiter.
    Examples go through the model in batches of about batch_tokens tokens (padding included; at least one
    example per batch), similar lengths together, except multiple-choice examples with a long shared
    prefix (shared_prefix_choice). Under torchrun, rank r takes examples r, r+world, ...; results are
    summed over ranks. With a name, a task that runs longer than progress_every seconds reports progress.
    """
    rank = dist.get_rank() if dist.is_initialized() else 0
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    mine = [(idx, prepare_example(idx, model, tokenizer, data, task_meta))
            for idx in range(rank, len(data), world_size)]
    mine.sort(key=lambda example: max(len(seq) for seq in example[1][0]))  # similar lengths together: less padding
    correct = torch.zeros(len(data), dtype=torch.float32)
    size = lambda example: sum(len(seq) for seq in example[1][0])  # its tokens, all choices
    progress = TaskProgress(name, sum(size(example) for example in mine), progress_every)
    batches = []  # (examples, rows, longest row)
    for example in mine:
        idx, (tokens, starts, ends) = example
        if task_meta["task_type"] == "multiple_choice" and shares_a_long_prefix(model, tokens, starts, ends):
            choice = shared_prefix_choice(model, tokenizer, device, tokens, starts[0], ends)
            correct[idx] = float(choice == data[idx]["gold"])
            progress.advance(size(example))
            continue
        rows, longest = len(example[1][0]), max(len(seq) for seq in example[1][0])
        if batches and (batches[-1][1] + rows) * max(batches[-1][2], longest) <= batch_tokens:
            examples, batch_rows, batch_longest = batches[-1]
            batches[-1] = (examples + [example], batch_rows + rows, max(batch_longest, longest))
        else:
            batches.append(([example], rows, longest))
    for examples, _, _ in batches:
        for (idx, _), right in zip(examples, evaluate_batch(model, tokenizer, data, device, task_meta, examples)):
            correct[idx] = float(right)
        progress.advance(sum(size(example) for example in examples))
    if world_size > 1:
        correct = correct.to(device)
        dist.barrier()
        dist.all_reduce(correct, op=dist.ReduceOp.SUM)
    return correct.mean().item()


# -----------------------------------------------------------------------------
# The whole bundle


def centered_score(accuracy, baseline_percent):
    """0 at the random-guess baseline, 1 at perfect accuracy."""
    baseline = 0.01 * baseline_percent
    return (accuracy - baseline) / (1.0 - baseline)


def load_bundle(bundle_dir):
    """
    (tasks, baselines) from an unpacked eval bundle. tasks: list of dicts with label, task_meta, path;
    baselines: {label: random baseline in percent}.
    """
    import yaml  # only needed here

    config_path = os.path.join(bundle_dir, "core.yaml")
    meta_path = os.path.join(bundle_dir, "eval_meta_data.csv")
    for path in (config_path, meta_path):
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} is missing: {bundle_dir} is not a complete eval bundle; "
                                    "delete it to re-download")
    try:
        with open(config_path, "r", encoding="utf-8") as f:
            config = yaml.safe_load(f)
        tasks = []
        for task in config["icl_tasks"]:
            tasks.append({
                "label": task["label"],
                "path": os.path.join(bundle_dir, "eval_data", task["dataset_uri"]),
                "task_meta": {
                    "task_type": task["icl_task_type"],
                    "dataset_uri": task["dataset_uri"],
                    "num_fewshot": task["num_fewshot"][0],
                    "continuation_delimiter": task.get("continuation_delimiter", " "),
                },
            })
    except (yaml.YAMLError, UnicodeDecodeError, KeyError, IndexError, TypeError) as e:
        raise DamagedFileError(config_path, f"it is not a readable task list ({type(e).__name__}: {e})",
                               bundle_fix(bundle_dir)) from None
    try:
        with open(meta_path, "r", encoding="utf-8") as f:
            baselines = {row["Eval Task"]: float(row["Random baseline"]) for row in csv.DictReader(f)}
    except (UnicodeDecodeError, KeyError, ValueError, TypeError, csv.Error) as e:
        raise DamagedFileError(meta_path, f"it is not a readable baseline table ({type(e).__name__}: {e})",
                               bundle_fix(bundle_dir)) from None
    return tasks, baselines


def load_task_data(path, max_per_task=-1):
    """Examples of one task in a fixed shuffled order (the files are often sorted), then cropped."""
    try:
        with open(path, "r", encoding="utf-8") as f:
            data = [json.loads(line) for line in f if line.strip()]
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DamagedFileError(path, f"a line is not valid JSON ({e})", bundle_fix(os.path.dirname(path))) from None
    random.Random(1337).shuffle(data)
    return data[:max_per_task] if max_per_task > 0 else data


def evaluate_core(model, tokenizer, device, bundle_dir, max_per_task=-1, should_stop=None):
    """
    Every task of the bundle. Tasks whose data file or baseline is missing are reported and skipped.
    Returns {"results": {label: acc}, "centered_results": {label: centered}, "core_metric": mean centered,
    "times": {label: seconds}, "skipped": {label: reason}}.
    should_stop(), if given, is called before each task (on every rank, at the same points); when it
    returns True the evaluation ends there and returns None (a training run stopping to save).
    """
    tasks, baselines = load_bundle(bundle_dir)
    skipped = {}
    runnable = []
    for task in tasks:
        if not os.path.exists(task["path"]):
            skipped[task["label"]] = f"data file {task['task_meta']['dataset_uri']} not in the bundle"
        elif task["label"] not in baselines:
            skipped[task["label"]] = "no random baseline in eval_meta_data.csv"
        else:
            runnable.append(task)
    for label, reason in skipped.items():
        print0(f"Skipping {label}: {reason}")
    most_shots = max((task["task_meta"]["num_fewshot"] for task in runnable), default=0)
    if 0 < max_per_task <= most_shots:  # few-shot examples come from the cropped examples, as in the reference
        raise ValueError(f"max_per_task={max_per_task} is too small: some tasks are {most_shots}-shot, "
                         f"so use --max_per_task={most_shots + 1} or more (or -1 for all examples)")

    results, centered, times = {}, {}, {}
    t_begin = time.time()
    for i, task in enumerate(runnable):
        if should_stop is not None and should_stop():
            print0(f"CORE evaluation stopped after {i} of {len(runnable)} tasks")
            return None
        label, meta = task["label"], task["task_meta"]
        t0 = time.time()
        data = load_task_data(task["path"], max_per_task)
        accuracy = evaluate_task(model, tokenizer, data, device, meta, name=label)
        times[label] = time.time() - t0
        results[label] = accuracy
        centered[label] = centered_score(accuracy, baselines[label])
        elapsed = time.time() - t_begin
        eta = elapsed / (i + 1) * (len(runnable) - i - 1)
        print0(
            f"[{i + 1:2d}/{len(runnable)}] {label:<34} {meta['num_fewshot']:2d}-shot {meta['task_type']:<17} "
            f"n={len(data):<5d} accuracy {accuracy:.4f} | centered {centered[label]:+.4f} | "
            f"{times[label]:6.1f}s | elapsed {format_seconds(elapsed)}, eta {format_seconds(eta)}"
        )
    core_metric = sum(centered.values()) / len(centered) if centered else float("nan")
    return {"results": results, "centered_results": centered, "core_metric": core_metric, "times": times,
            "skipped": skipped}


# -----------------------------------------------------------------------------
# The eval bundle (~160 MB): downloaded once to <base>/eval_bundle from NANOCHAT_EVAL_BUNDLE_URL
# (http(s)://, file:// or a local path) or, by default, from the reference's public bucket.

_DEFAULT_EVAL_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"


def bundle_fix(path_inside):
    """What to do about a damaged file of the unpacked bundle (or of the zip)."""
    bundle_dir = os.path.join(get_base_dir(), "eval_bundle")
    zip_path = os.path.join(get_base_dir(), "eval_bundle.zip")
    if os.path.abspath(path_inside).startswith(os.path.abspath(bundle_dir) + os.sep):
        return (f"Delete the unpacked bundle (rm -r {bundle_dir}) and run the same command again: it is unpacked "
                f"again from {zip_path} (downloaded again if that is gone too).")
    return (f"Delete it (rm {zip_path}) and run the same command again: it is downloaded again from "
            f"NANOCHAT_EVAL_BUNDLE_URL (if the source is damaged too, point that at a good copy).")


def unpack_bundle(zip_path):
    """
    Unzip into a temporary folder next to the destination, then rename it into place, so that
    <base>/eval_bundle either does not exist or is complete (an interrupted unzip leaves no half bundle).
    The zip's own sizes and CRC-32s of the unpacked files go into eval_bundle/manifest.json.
    """
    base_dir = get_base_dir()
    bundle_dir = os.path.join(base_dir, "eval_bundle")
    tmp_dir = tempfile.mkdtemp(dir=base_dir, prefix="eval_bundle.", suffix=".tmp")
    try:
        try:
            with zipfile.ZipFile(zip_path, "r") as zf:
                zf.extractall(tmp_dir)  # checks every member's CRC-32
                members = [info for info in zf.infolist() if not info.is_dir()]
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:
            raise DamagedFileError(zip_path, f"it is not a readable zip ({e})", bundle_fix(zip_path)) from None
        # The published zip holds a top-level eval_bundle/ folder; accept a zip of its contents too.
        candidates = [os.path.join(tmp_dir, "eval_bundle"), tmp_dir]
        unpacked = next((c for c in candidates if os.path.exists(os.path.join(c, "core.yaml"))), None)
        if unpacked is None:
            raise ValueError(f"{zip_path} has no core.yaml (at its root or under eval_bundle/): not an eval bundle")
        prefix = os.path.relpath(unpacked, tmp_dir)
        records = {os.path.relpath(info.filename, prefix) if prefix != "." else info.filename:
                   {"size": info.file_size, "crc32": f"{info.CRC:08x}"} for info in members}
        atomic_write(os.path.join(unpacked, MANIFEST), lambda f: json.dump(records, f, indent=1), mode="w")
        os.rename(unpacked, bundle_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    print0(f"Unpacked the eval bundle to {bundle_dir}")


def verify_bundle(bundle_dir):
    """Every unpacked file as the zip held it (by its manifest; a bundle unpacked without one is not checked)."""
    manifest = os.path.join(bundle_dir, MANIFEST)
    if not os.path.exists(manifest):
        return
    try:
        with open(manifest, encoding="utf-8") as f:
            records = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DamagedFileError(manifest, f"it is not valid JSON ({e})", bundle_fix(manifest)) from None
    for name, record in records.items():
        path = os.path.join(bundle_dir, name)
        problem = record_problem(path, record)
        if problem is not None:
            raise DamagedFileError(path, problem, bundle_fix(path))


def ensure_eval_bundle():
    """Path of the unpacked eval bundle, downloading and unpacking it first if needed (once across ranks)."""
    bundle_dir = os.path.join(get_base_dir(), "eval_bundle")
    if os.path.isdir(bundle_dir):
        verify_bundle(bundle_dir)
        return bundle_dir
    url = os.environ.get("NANOCHAT_EVAL_BUNDLE_URL") or _DEFAULT_EVAL_BUNDLE_URL
    if os.path.exists(url):  # a plain local path
        url = "file://" + os.path.abspath(url)
    try:
        zip_path = download_file_with_lock(url, "eval_bundle.zip", postprocess_fn=unpack_bundle)
    except OSError as e:  # network down, 404, unreadable file:// path
        raise RuntimeError(f"could not download the CORE eval bundle from {url} ({e}). "
                           "Point NANOCHAT_EVAL_BUNDLE_URL at a reachable copy (http(s):// or file://), "
                           "or turn CORE off with --core_metric_every=-1") from None
    # The zip may be there from an earlier run whose unzip did not finish: unpack it now.
    with FileLock(zip_path + ".lock"):
        if not os.path.isdir(bundle_dir):
            unpack_bundle(zip_path)
    verify_bundle(bundle_dir)
    return bundle_dir


def format_results_csv(out):
    """The reference's CSV layout: padded Task, Accuracy, Centered columns, then the CORE line."""
    lines = [f"{'Task':<35}, {'Accuracy':<10}, {'Centered':<10}"]
    for label, accuracy in out["results"].items():
        lines.append(f"{label:<35}, {accuracy:<10.6f}, {out['centered_results'][label]:<10.6f}")
    lines.append(f"{'CORE':<35}, {'':<10}, {out['core_metric']:<10.6f}")
    return "\n".join(lines) + "\n"
