"""
Reinforcement learning from a task's rewards, as the reference's chat_rl does it (scripts/chat_rl.py runs the loop):
on-policy policy gradient, close to REINFORCE. Per problem, num_samples completions are sampled; each one's
advantage is its reward minus the mean reward of the problem's samples (no division by the standard deviation);
the loss is minus the sum of log p(token) x advantage over the sampled tokens, normalised by the number of
valid tokens (token-level, not sequence-level). No KL penalty, no importance ratio or clipping: the samples
come from the current weights.

- rollouts(): the samples of one problem, their rewards, advantages, and the training batch (prompt tokens and
  the tokens the Engine forced, such as calculator output, are not trained on: the Engine's mask 0);
- policy(): the per-token losses of a training pass, eager or compiled. The rows of a pass are samples of one
  prompt, so the prompt is computed once, not once per row (SharedPrefix): ~1.9x the training tok/s of whole
  rows at depth 4 on CPU (dev/bench_rl.py);
- policy_gradient_loss(): the loss of one batch of rows (a batch whose advantages are all 0, as when a problem's
  0/1 rewards are all equal, has loss and gradient exactly 0: chat_rl skips it, and zero_missing_grads keeps the
  step the same);
- sample_outcomes() and pass_at_k(): how many problems one of the first k samples solves, for k = 1..K.
"""

from dataclasses import dataclass
from functools import partial

import torch


def rollout_seed(step, example_index, batch_index):
    """The sampling seed of one batch of samples: fixed by (step, problem, batch), so a run (and a resumed one)
    draws the same rollouts (the same derivation as the reference's: the positive half of the tuple's hash)."""
    return hash((step, example_index, batch_index)) & 0x7FFFFFFF


@dataclass
class Rollouts:
    """
    The samples of one problem: sequences (prompt + completion ids), rewards and the training rows. A row is
    prefix + inputs: the prompt but its last token, shared by every row, then the row's own tokens from the prompt's
    last one on (the first whose next token is trained on).
    """
    sequences: list  # per sample: prompt ids then the completion's ids (without the ending token)
    prompt_len: int
    rewards: torch.Tensor  # (num_samples,)
    advantages: torch.Tensor  # (num_samples,): reward minus the problem's mean reward
    prefix: torch.Tensor  # (1, prompt_len - 1) token ids
    inputs: torch.Tensor  # (num_samples, T) token ids, padded
    targets: torch.Tensor  # (num_samples, T) next ids; -1 where not trained on (forced tokens, padding)

    @property
    def completion_tokens(self):
        return sum(len(sequence) - self.prompt_len for sequence in self.sequences)

    @property
    def row_tokens(self):
        """Tokens of the training rows padded to the longest sample only, as the reference pads them."""
        return len(self.sequences) * (max(len(sequence) for sequence in self.sequences) - 1)


@torch.no_grad()
def rollouts(engine, tokenizer, task, example_index, step, num_samples, batch_size, max_new_tokens,
             temperature=1.0, top_k=50, pad_multiple=1):
    """Sample num_samples completions of task[example_index] in batches of batch_size and score them; the rows
    after the shared prompt are padded to a multiple of pad_multiple tokens (see training_rows)."""
    if num_samples % batch_size != 0:
        raise ValueError(f"num_samples ({num_samples}) must be a multiple of the sampling batch size ({batch_size})")
    conversation = task[example_index]
    prompt = tokenizer.render_for_completion(conversation)
    sequences, masks = [], []
    for batch_index in range(num_samples // batch_size):
        batch, batch_masks = engine.generate_batch(prompt, num_samples=batch_size, max_tokens=max_new_tokens,
                                                   temperature=temperature, top_k=top_k,
                                                   seed=rollout_seed(step, example_index, batch_index))
        sequences += batch
        masks += batch_masks
    rewards = [task.reward(conversation, tokenizer.decode(sequence[len(prompt):])) for sequence in sequences]
    device = engine.model.get_device()
    rewards = torch.tensor(rewards, dtype=torch.float32, device=device)
    if any(sequence[:len(prompt)] != prompt for sequence in sequences):
        raise RuntimeError("the Engine returned a sample that does not start with its prompt")
    shared = len(prompt) - 1
    inputs, targets = training_rows([s[shared:] for s in sequences], [m[shared:] for m in masks],
                                    pad_id=tokenizer.encode_special("<|assistant_end|>"), device=device,
                                    multiple=pad_multiple)
    prefix = torch.tensor([prompt[:shared]], dtype=torch.long, device=device)
    return Rollouts(sequences, len(prompt), rewards, rewards - rewards.mean(), prefix, inputs, targets)


def training_rows(sequences, masks, pad_id, device, multiple=1):
    """
    (inputs, targets) of the sequences padded to one length: targets are the next ids, -1 where the next token's
    mask is 0 and in the padding. The length is rounded up to a multiple of `multiple`, so that a compiled model
    meets a few shapes only; padding at the end changes no trained token's log-probability (attention is causal).
    """
    width = -(-(max(len(sequence) for sequence in sequences) - 1) // multiple) * multiple + 1
    ids = torch.tensor([s + [pad_id] * (width - len(s)) for s in sequences], dtype=torch.long, device=device)
    trained = torch.tensor([m + [0] * (width - len(m)) for m in masks], dtype=torch.bool, device=device)
    targets = torch.where(trained[:, 1:], ids[:, 1:], -1)
    return ids[:, :-1], targets


class SharedPrefix:
    """
    The keys and values of a prefix that every row of a batch starts with, kept with their autograd history. It
    stands in for the Engine's KVCache in GPT.forward: a first forward of the prefix (1, P) stores them, a
    second one of the rows (B, T) attends over them, expanded to the B rows (no copy), and then causally over
    its own. The gradient of every row flows back into the one prefix. Rows of 8 samples of a GSM8K prompt
    spend about half their tokens on it.
    """

    def __init__(self):
        self.pos = 0  # the prefix's length once its forward has run (GPT.forward advances it)
        self.keys, self.values = [], []

    def insert(self, layer_idx, k, v):
        if self.pos == 0:  # the prefix itself
            self.keys.append(k)
            self.values.append(v)
            return k, v
        rows = k.size(0)
        return (torch.cat([self.keys[layer_idx].expand(rows, -1, -1, -1), k], dim=2),
                torch.cat([self.values[layer_idx].expand(rows, -1, -1, -1), v], dim=2))


def prefix_shared_losses(model, prefix, inputs, targets):
    """
    The per-token losses (B, T) of rows prefix (1, P) + inputs (B, T), at targets (B, T) (-1: 0 loss), the prefix
    computed once: the same numbers as model(cat(prefix, inputs), ...) on its last T positions, up to rounding.
    """
    if prefix.size(1) == 0:
        return model(inputs, targets, loss_reduction="none").view_as(inputs)
    cache = SharedPrefix()
    model(prefix, kv_cache=cache, last_only=True)  # its one logit row is unused (a compiled graph drops it)
    return model(inputs, targets, kv_cache=cache, loss_reduction="none").view_as(inputs)


COMPILED_ROW_MULTIPLE = 32  # a compiled policy's rows after the prompt are padded to a multiple of this


def policy(model, compile=False):
    """
    prefix_shared_losses of the model, as a function of (prefix, inputs, targets). Compiled: the prompt's length is
    a symbolic size (one graph for every prompt), the rows' length fixed (the chunked loss unrolls a loop over it),
    one graph per multiple of COMPILED_ROW_MULTIPLE: 35-45 s each to compile at depth 4 on CPU (less when
    inductor's on-disk cache has it).
    """
    if not compile:
        return partial(prefix_shared_losses, model)
    torch._dynamo.config.recompile_limit = 64  # one graph per rows' length: more than dynamo's default of 8
    compiled = torch.compile(prefix_shared_losses, dynamic=False)

    def compiled_losses(prefix, inputs, targets):
        torch._dynamo.maybe_mark_dynamic(prefix, 1)
        return compiled(model, prefix, inputs, targets)
    return compiled_losses


def policy_gradient_loss(token_losses, prefix, inputs, targets, advantages, normalizer):
    """
    -sum over trained tokens of log p(token) x its row's advantage, / normalizer (the caller's count of valid
    tokens x passes x problems per rank, so that accumulated passes and ranks average as one batch).
    token_losses is a policy() function.
    """
    log_probs = -token_losses(prefix, inputs, targets)  # (B, T); 0 where targets are -1
    return -(log_probs * advantages[:, None]).sum() / normalizer


def zero_missing_grads(model):
    """Zero gradients for the parameters that have none, as a step whose passes were all skipped (every advantage
    0) would have computed: the optimizers then step as the reference's do (momentum moves the weights)."""
    for param in model.parameters():
        if param.grad is None:
            param.grad = torch.zeros_like(param)


@torch.no_grad()
def sample_outcomes(engine, tokenizer, task, problems, num_samples, max_new_tokens, temperature=1.0, top_k=50):
    """Per problem index in problems, whether each of num_samples samples passes task.evaluate (in order)."""
    outcomes = []
    for index in problems:
        conversation = task[index]
        prompt = tokenizer.render_for_completion(conversation)
        sequences, _ = engine.generate_batch(prompt, num_samples=num_samples, max_tokens=max_new_tokens,
                                             temperature=temperature, top_k=top_k)
        outcomes.append([bool(task.evaluate(conversation, tokenizer.decode(s[len(prompt):]))) for s in sequences])
    return outcomes


def pass_at_k(outcomes, k_max):
    """outcomes: per problem, its samples' pass/fail in order -> [number of problems passed by one of the first
    k samples, for k = 1..k_max] (a count, to be summed over ranks before dividing by the number of problems)."""
    return [sum(any(samples[:k]) for samples in outcomes) for k in range(1, k_max + 1)]
