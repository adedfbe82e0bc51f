"""
Reinforcement learning (nanochat/rl.py, scripts/chat_rl.py): the policy-gradient loss against a hand computation,
masks, pass@k, a reward that really rises on a task a tiny model can learn (and does not without advantages),
and the script at toy size: checkpoints loadable with -i rl, exact resume after Ctrl-C, two ranks equal to one.
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from nanochat.engine import Engine
from nanochat.gpt import GPTConfig, build_gpt
from nanochat.rl import (pass_at_k, policy, policy_gradient_loss, rollout_seed, rollouts, training_rows,
                         zero_missing_grads)
from conftest import environment
from test_chat_stages import read_log, run_script
from test_engine import CharTokenizer
from toy_task_data import WORDS

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: a second thread only waits
    yield
    torch.set_num_threads(previous)


def tiny_gpt(vocab_size, seed=0, n_head=2, n_kv_head=None, n_layer=1):
    torch.manual_seed(seed)
    return build_gpt(GPTConfig(sequence_len=64, vocab_size=vocab_size, n_layer=n_layer, n_head=n_head,
                               n_kv_head=n_kv_head or n_head, n_embd=32))


NO_PREFIX = torch.zeros(1, 0, dtype=torch.long)  # rows that share nothing: each computed whole


# -----------------------------------------------------------------------------
# The loss, the masks, pass@k

def test_policy_gradient_loss_equals_a_hand_computation():
    model = tiny_gpt(20)
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(2)
    prefix = torch.randint(0, 20, (1, 4), generator=g)  # the prompt the three rows share (computed once)
    inputs = torch.randint(0, 20, (3, 7), generator=g)
    targets = torch.randint(0, 20, (3, 7), generator=g)
    targets[0, :3] = -1  # untrained
    targets[1, 4:] = -1  # padding
    targets[2, 2] = -1  # a token the calculator forced
    advantages = torch.tensor([0.5, -0.25, -0.25])
    loss = policy_gradient_loss(policy(model), prefix, inputs, targets, advantages, normalizer=11.0)
    with torch.no_grad():  # the whole rows, prompt included: (3, 4 + 7, V), the soft-capped logits
        log_probs = F.log_softmax(model(torch.cat([prefix.expand(3, -1), inputs], dim=1)), dim=-1)[:, 4:]
    expected = 0.0
    for b in range(3):
        for t in range(7):
            if targets[b, t] >= 0:
                expected -= log_probs[b, t, targets[b, t]].item() * advantages[b].item()
    assert loss.item() == pytest.approx(expected / 11.0, rel=1e-5)


def test_untrained_tokens_carry_no_gradient():
    # prompt tokens (mask 0) and calculator output the Engine forced (mask 0) are not trained on
    sequences = [[1, 2, 3, 4, 5, 6], [1, 2, 3, 7]]
    masks = [[0, 0, 0, 1, 0, 1], [0, 0, 0, 1]]  # sample 0: token 5 was forced
    inputs, targets = training_rows(sequences, masks, pad_id=9, device="cpu")
    assert inputs.tolist() == [[1, 2, 3, 4, 5], [1, 2, 3, 7, 9]]
    assert targets.tolist() == [[-1, -1, 4, -1, 6], [-1, -1, 7, -1, -1]]
    model = tiny_gpt(10)
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(3))
    advantages = torch.tensor([1.0, -1.0])
    base = policy_gradient_loss(policy(model), NO_PREFIX, inputs, targets, advantages, 3.0)
    changed = targets.clone()
    for b, t in ((0, 0), (0, 3), (1, 4)):  # what a masked target would have been makes no difference
        changed[b, t] = -1
    assert torch.equal(policy_gradient_loss(policy(model), NO_PREFIX, inputs, changed, advantages, 3.0), base)
    model.zero_grad()
    policy_gradient_loss(policy(model), NO_PREFIX, inputs, torch.full_like(targets, -1), advantages, 3.0).backward()
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())  # nothing trained: no gradient


def test_skipping_passes_whose_advantages_are_all_zero_changes_no_gradient():
    # chat_rl does not compute a pass whose rows all have advantage 0 (e.g. a problem's rewards all equal): computed,
    # its gradient is exactly 0, so the step's gradients are the same bits; with every pass skipped they are zeros
    model = tiny_gpt(10)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(6)
    passes = [(torch.randint(0, 10, (2, 6), generator=g), torch.randint(0, 10, (2, 6), generator=g), advantages)
              for advantages in (torch.tensor([0.5, -0.5]), torch.zeros(2), torch.tensor([-0.25, 0.25]))]

    def grads(skip, which):
        model.zero_grad(set_to_none=True)
        for inputs, targets, advantages in (passes[i] for i in which):
            if skip and not advantages.any():
                continue
            policy_gradient_loss(policy(model), NO_PREFIX, inputs, targets, advantages, 7.0).backward()
        zero_missing_grads(model)
        return [p.grad.clone() for p in model.parameters()]

    for which in ((0, 1, 2), (1,)):
        computed, skipped = grads(False, which), grads(True, which)
        assert all(torch.equal(a, b) for a, b in zip(computed, skipped))
    assert any(t.any() for t in grads(True, (0, 1, 2))) and not any(t.any() for t in grads(True, (1,)))


def test_the_prompt_computed_once_gives_the_whole_rows_loss_and_gradients():
    # A pass's rows are samples of one prompt: chat_rl computes the prompt once (SharedPrefix) and pads the rows
    # after it (to a multiple of 32 tokens when compiled). Neither may change the loss or a gradient: in fp32 they
    # equal the whole rows' computed apart (grouped-query attention: the expanded keys and values too).
    prompt = [1, 2, 3, 4, 5]
    sequences = [prompt + [6, 7, 8, 9], prompt + [7, 6], prompt + [8, 9, 9, 6, 7, 8]]
    masks = [[0] * 5 + [1, 0, 1, 1], [0] * 5 + [1, 1], [0] * 5 + [1] * 6]  # row 0: token 7 was forced
    whole_inputs, whole_targets = training_rows(sequences, masks, pad_id=9, device="cpu")
    shared = len(prompt) - 1
    prefix = torch.tensor([prompt[:shared]])
    rows = [s[shared:] for s in sequences], [m[shared:] for m in masks]
    inputs, targets = training_rows(*rows, pad_id=9, device="cpu")
    padded_inputs, padded_targets = training_rows(*rows, pad_id=9, device="cpu", multiple=8)
    assert torch.equal(torch.cat([prefix.expand(3, -1), inputs], dim=1), whole_inputs)
    assert torch.equal(whole_targets[:, shared:], targets) and (whole_targets[:, :shared] == -1).all()
    assert padded_inputs.shape == (3, 8) and (padded_targets[:, targets.size(1):] == -1).all()
    model = tiny_gpt(10, n_head=4, n_kv_head=2, n_layer=2)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3, generator=torch.Generator().manual_seed(4))
    advantages = torch.tensor([1.0, -0.5, 0.25])

    def loss_and_grads(token_losses, *batch):
        model.zero_grad(set_to_none=True)
        loss = policy_gradient_loss(token_losses, *batch, advantages, 3.0)
        loss.backward()
        return [loss.detach()] + [p.grad.clone() for p in model.parameters()]

    expected = loss_and_grads(policy(model), NO_PREFIX, whole_inputs, whole_targets)
    for got in (loss_and_grads(policy(model), prefix, inputs, targets),
                loss_and_grads(policy(model), prefix, padded_inputs, padded_targets),
                loss_and_grads(policy(model, compile=True), prefix, padded_inputs, padded_targets)):
        for e, g in zip(expected, got):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


def test_pass_at_k_counts_problems_solved_within_k_samples():
    outcomes = [[False, False, True, False], [True, False, False, False], [False] * 4, [False, True, True, True]]
    assert pass_at_k(outcomes, 4) == [1, 2, 3, 3]
    assert pass_at_k([], 2) == [0, 0]


def test_rollout_seeds_are_fixed_by_step_problem_and_batch():
    seeds = {rollout_seed(s, e, b) for s in range(3) for e in range(3) for b in range(2)}
    assert len(seeds) == 18 and all(0 <= s < 2 ** 31 for s in seeds)
    assert rollout_seed(5, 7, 1) == rollout_seed(5, 7, 1)


# -----------------------------------------------------------------------------
# RL works: a tiny model learns to answer with one letter

class OneWordTask:
    """One problem: the reward is 1 when the completion starts with `word`."""

    def __init__(self, word):
        self.word = word

    def __len__(self):
        return 1

    def __getitem__(self, index):
        return {"messages": [{"role": "user", "content": "say it"}]}

    def reward(self, conversation, completion):
        return float(completion.startswith(self.word))


class PromptTokenizer(CharTokenizer):
    def render_for_completion(self, conversation):
        ids = self.encode_special
        return [ids("<|bos|>"), ids("<|user_start|>"), *self.encode("say it"), ids("<|user_end|>"),
                ids("<|assistant_start|>")]


def train_on_one_word(zero_advantages, steps=30):
    tokenizer = PromptTokenizer()
    task = OneWordTask("q")
    model = tiny_gpt(tokenizer.get_vocab_size())
    optimizers = model.setup_optimizers(unembedding_lr=0.05, embedding_lr=0.2, matrix_lr=0.02)
    engine = Engine(model, tokenizer)
    rewards = []
    for step in range(steps):
        batch = rollouts(engine, tokenizer, task, 0, step, num_samples=16, batch_size=16, max_new_tokens=2)
        advantages = torch.zeros_like(batch.advantages) if zero_advantages else batch.advantages
        normalizer = (batch.targets >= 0).sum().clamp(min=1)
        policy_gradient_loss(policy(model), batch.prefix, batch.inputs, batch.targets, advantages,
                             normalizer).backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        rewards.append(batch.rewards.mean().item())
    return rewards


def test_reward_rises_with_advantages_and_not_without():
    learned = train_on_one_word(zero_advantages=False)
    frozen = train_on_one_word(zero_advantages=True)
    assert sum(learned[:5]) / 5 < 0.2  # it starts near chance (one token of the vocabulary)
    assert sum(learned[-5:]) / 5 > 0.6, learned  # and learns the word
    assert sum(frozen[-5:]) / 5 < 0.2 and max(frozen) < 0.3, frozen  # no advantage, no learning


# -----------------------------------------------------------------------------
# scripts/chat_rl.py at toy size

RL = ["--device_type=cpu", "--dtype=float32", "--num_iterations=4", "--examples_per_step=2", "--num_samples=4",
      "--device_batch_size=2", "--max_new_tokens=8", "--eval_every=2", "--eval_examples=4", "--save_every=2"]


@pytest.fixture(scope="module")
def rl_base(tmp_path_factory):
    """
    A tokenizer, GSM8K-shaped problems whose answers are 1, 2 or 3, and an SFT checkpoint that answers
    "#### 1", "## 3", "###### 2"... at random (a bigram model, see conftest.make_chat_base_dir): rewards are
    mixed from the first steps, so the weights really move.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq
    from conftest import _set_next_token
    from nanochat.checkpoint_manager import save_checkpoint
    from nanochat.tokenizer import RustBPETokenizer

    base = str(tmp_path_factory.mktemp("rl_base"))
    data = os.path.join(base, "served")
    rng = random.Random(0)
    for split, n in (("train", 8), ("test", 4)):
        rows = [{"question": " ".join(rng.choice(WORDS) for _ in range(4)) + "?",
                 "answer": f"it is #### {rng.randint(1, 3)}"} for _ in range(n)]
        os.makedirs(os.path.join(data, "openai/gsm8k/main", split))
        pq.write_table(pa.Table.from_pylist(rows), os.path.join(data, "openai/gsm8k/main", split, "0000.parquet"))
    texts = [" ".join(rng.choice(WORDS) for _ in range(40)) + " #### 1 #### 2 #### 3" for _ in range(60)]
    tokenizer = RustBPETokenizer.train_from_iterator(iter(texts), 300)
    tokenizer.save(os.path.join(base, "tokenizer"))
    (hashes,), (space,), *digits = [tokenizer.encode(text) for text in ("##", " ", "1", "2", "3")]
    assert all(len(d) == 1 for d in digits)
    config = dict(sequence_len=64, vocab_size=300, n_layer=1, n_head=1, n_kv_head=1, n_embd=32)
    model = tiny_gpt(300, n_head=1)
    special = tokenizer.encode_special
    # "##" repeats (more likely) or a space follows; then one of three digits, then the end of the answer:
    # "## 2" earns nothing, "#### 2" or longer earns 1 when 2 is the answer
    _set_next_token(model, special("<|assistant_start|>"), hashes)
    _set_next_token(model, hashes, hashes, strength=9.0)
    _set_next_token(model, hashes, space)
    for (digit,) in digits:
        _set_next_token(model, space, digit)
        _set_next_token(model, digit, special("<|assistant_end|>"))
    for tag in ("d1", "resumed", "ranks", "compiled", "compiled_resumed"):
        save_checkpoint(os.path.join(base, "chatsft_checkpoints", tag), 3, model.state_dict(), None,
                        {"step": 3, "model_config": config})
    with environment(NANOCHAT_BASE_DIR=base, NANOCHAT_TASKS_URL=f"file://{data}"):
        yield base


def rl_folder(base, tag):
    return os.path.join(base, "chatrl_checkpoints", tag)


def test_chat_rl_trains_saves_logs_and_loads_as_rl(rl_base, capsys):
    assert run_script("scripts.chat_rl", [*RL, "-g", "d1"]) == 0
    out = capsys.readouterr().out
    assert "reward:" in out and "rollouts:" in out and "ETA:" in out
    folder = rl_folder(rl_base, "d1")
    log = read_log(folder)
    steps = [r for r in log if "reward" in r]
    evals = [r for r in log if "pass@1" in r]
    assert [r["step"] for r in steps] == [0, 1, 2, 3]
    assert [r["step"] for r in evals] == [0, 2, 4]
    assert all(0 <= r["reward"] <= 1 and r["rollout_tok_per_sec"] > 0 for r in steps)
    assert all(r["pass@1"] <= r["pass@2"] <= 1 for r in evals)
    assert sorted(f for f in os.listdir(folder) if f.startswith("model_")) == ["model_000002.pt", "model_000004.pt"]
    start = torch.load(os.path.join(rl_base, "chatsft_checkpoints", "d1", "model_000003.pt"))
    end = torch.load(os.path.join(folder, "model_000004.pt"))
    assert any(not torch.equal(start[k], end[k]) for k in start)  # mixed rewards: the weights moved
    section = open(os.path.join(rl_base, "report", "chat-rl.md")).read()
    assert "Final mean reward" in section and "pass@2" in section
    # the RL model is what `-i rl` loads
    assert run_script("scripts.chat_eval", ["-i", "rl", "-g", "d1", "-a", "GSM8K", "-x", "2", "-m", "8",
                                            "--device_type=cpu"]) == 0
    assert "GSM8K accuracy" in capsys.readouterr().out


def test_chat_rl_compiled_samples_the_same_first_rollouts_and_trains_alike(rl_base, capsys):
    # --compile=true: the training passes compiled on padded rows, and the rollouts decoded by a compiled step that
    # reads the weights as they are trained; step 0's rollouts are the eager run's, and so is its loss up to rounding
    assert run_script("scripts.chat_rl", [*RL, "-g", "compiled", "--num_iterations=2", "--eval_every=-1",
                                          "--save_every=-1", "--compile=false"]) == 0
    eager = [r for r in read_log(rl_folder(rl_base, "compiled")) if "reward" in r]
    shutil.rmtree(rl_folder(rl_base, "compiled"))
    assert run_script("scripts.chat_rl", [*RL, "-g", "compiled", "--num_iterations=2", "--eval_every=-1",
                                          "--save_every=-1", "--compile=true"]) == 0
    out = capsys.readouterr().out
    assert "torch.compile: True" in out and "(compile decoding)" in out
    compiled = [r for r in read_log(rl_folder(rl_base, "compiled")) if "reward" in r]
    assert len(eager) == len(compiled) == 2
    assert compiled[0]["reward"] == eager[0]["reward"]
    assert compiled[0]["completion_tokens"] == eager[0]["completion_tokens"]
    assert compiled[0]["loss"] == pytest.approx(eager[0]["loss"], rel=1e-4, abs=1e-6)


def run_stopped_by_ctrl_c(monkeypatch, args):
    """chat_rl with args, sent SIGINT during step 1's rollouts: it saves that step and stops."""
    import nanochat.rl
    real = nanochat.rl.rollouts
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # during step 1's rollouts
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(nanochat.rl, "rollouts", interrupted)
    assert run_script("scripts.chat_rl", args) == 0
    monkeypatch.setattr(nanochat.rl, "rollouts", real)


def test_chat_rl_resumed_after_ctrl_c_equals_the_uninterrupted_run(rl_base, monkeypatch, another_machine):
    """Also where the start-up measurements would now choose otherwise (threads, Newton-Schulz dtype)."""
    if not os.path.exists(rl_folder(rl_base, "d1")):
        assert run_script("scripts.chat_rl", [*RL, "-g", "d1"]) == 0
    run_stopped_by_ctrl_c(monkeypatch, [*RL, "-g", "resumed"])
    folder = rl_folder(rl_base, "resumed")
    assert os.path.exists(os.path.join(folder, "model_000002.pt")) and os.path.exists(os.path.join(folder, "meta_000002.json"))
    saved = json.load(open(os.path.join(folder, "meta_000002.json")))["loop_state"]["machine_choices"]
    another_machine()
    assert run_script("scripts.chat_rl", [*RL, "-g", "resumed", "--resume_from_step=2"]) == 0
    assert_same_rl_run(rl_folder(rl_base, "d1"), folder)
    final = json.load(open(os.path.join(folder, "meta_000004.json")))["loop_state"]["machine_choices"]
    assert final == saved and torch.get_num_threads() == saved["threads"]


def test_chat_rl_compiled_resumed_equals_the_uninterrupted_run(rl_base, monkeypatch):
    # --compile=true: compiled rollouts (live weights) and training passes; the resumed run samples the same
    # rollouts, skips the same all-zero-advantage passes and trains to the same weights
    compiled = [*RL, "--compile=true"]
    shutil.rmtree(rl_folder(rl_base, "compiled"), ignore_errors=True)
    assert run_script("scripts.chat_rl", [*compiled, "-g", "compiled"]) == 0
    run_stopped_by_ctrl_c(monkeypatch, [*compiled, "-g", "compiled_resumed"])
    assert run_script("scripts.chat_rl", [*compiled, "-g", "compiled_resumed", "--resume_from_step=2"]) == 0
    assert_same_rl_run(rl_folder(rl_base, "compiled"), rl_folder(rl_base, "compiled_resumed"))


def assert_same_rl_run(full_folder, other_folder, exact=True):
    """The same rewards, losses and pass@k at every step and the same final weights."""
    full, other = read_log(full_folder), read_log(other_folder)
    pick = lambda log: {(r["step"], k): v for r in log for k, v in r.items()
                        if k == "reward" or k == "loss" or k.startswith("pass@")}
    a, b = pick(full), pick(other)
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] == b[key]) if exact else a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    w0 = torch.load(os.path.join(full_folder, "model_000004.pt"))
    w1 = torch.load(os.path.join(other_folder, "model_000004.pt"))
    for k in w0:
        assert torch.equal(w0[k], w1[k]) if exact else torch.allclose(w0[k], w1[k], rtol=1e-4, atol=1e-6), k


@pytest.mark.slow
def test_chat_rl_two_ranks_equal_one(rl_base):
    if not os.path.exists(rl_folder(rl_base, "d1")):
        assert run_script("scripts.chat_rl", [*RL, "-g", "d1"]) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "-m", "scripts.chat_rl", *RL, "-g", "ranks"], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # the same problems and seeds: the same rollouts; gradients summed in another order: close, not bit-equal
    assert_same_rl_run(rl_folder(rl_base, "d1"), rl_folder(rl_base, "ranks"), exact=False)
    meta = json.load(open(os.path.join(rl_folder(rl_base, "ranks"), "meta_000004.json")))
    assert meta["user_config"]["examples_per_step"] == 2


def test_bench_rl_times_a_step_without_the_reference(rl_base):
    env = dict(os.environ, OMP_NUM_THREADS="1", REF_DIR="")
    result = subprocess.run([sys.executable, "-m", "dev.bench_rl", "--model_tag=d1", "--examples=1", "--num_samples=2",
                             "--device_batch_size=2", "--max_new_tokens=4", "--steps=1", "--device_type=cpu"],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rollout tok/s" in result.stdout and "\nours " in result.stdout and "reference" not in result.stdout
