"""
nanochat/chat_eval.py with scripted models: a model that always answers correctly scores 1.0 on every
kind of task, one that never does scores 0 (and ChatCORE goes below 0); the ChatCORE arithmetic; the
problems split over two ranks. The generative path goes through the real Engine and KV cache.
"""

import random

import pytest
import torch

from nanochat.chat_eval import (ALL_TASKS, BASELINE_ACCURACY, centered_accuracy, chatcore, run_categorical_eval,
                                run_chat_eval, run_generative_eval)
from nanochat.engine import Engine
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import RustBPETokenizer

LETTERS = ["A", "B", "C", "D"]


def make_tokenizer():
    rng = random.Random(0)
    words = ["apple", "river", "stone", "cloud", "seven", "answer", "question", "choice", "which", "is"]
    texts = [" ".join(rng.choice(words) for _ in range(30)) + " A B C D 0123456789" for _ in range(50)]
    return RustBPETokenizer.train_from_iterator(iter(texts), 300)


class ChoiceTask:
    """Multiple choice in the reference's format: the assistant's answer is one letter of conversation['letters']."""
    eval_type = "categorical"

    def __init__(self, n, seed=0):
        rng = random.Random(seed)
        self.rows = [(f"set {seed} which is {rng.choice(['apple', 'stone'])} {i}?", rng.choice(LETTERS))
                     for i in range(n)]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        question, answer = self.rows[i]
        return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
                "letters": LETTERS}

    def evaluate(self, conversation, response):
        assert response in conversation["letters"]
        return response == conversation["messages"][-1]["content"]


class AnswerTask:
    """Open-ended: a completion passes when it is the reference answer (like GSM8K's final number)."""
    eval_type = "generative"

    def __init__(self, n):
        self.rows = [(f"question {i}: seven plus {i}?", str(7 + i)) for i in range(n)]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        question, answer = self.rows[i]
        return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}

    def evaluate(self, conversation, completion):
        return completion.strip() == conversation["messages"][-1]["content"]


class ScriptedModel(GPT):
    """
    Answers from a script: {prompt ids: answer ids}. After a known prompt, the logits put the next answer
    token first (then <|assistant_end|>); batches may be padded on the right. With a KV cache (the Engine)
    it stores the token ids themselves as keys, so each row's history follows the Engine's cache copies.
    """

    def __init__(self, vocab_size, script, assistant_end):
        super().__init__(GPTConfig(sequence_len=512, vocab_size=vocab_size, n_layer=1, n_head=1, n_kv_head=1, n_embd=4))
        self.script = {tuple(p): list(a) + [assistant_end] for p, a in script.items()}
        self.forward_batch_sizes = []

    def forward(self, idx, targets=None, kv_cache=None, loss_reduction="mean", last_only=False, capped=True,
                positions=None):
        B, T = idx.shape
        self.forward_batch_sizes.append(B)
        rows = idx.tolist()
        if kv_cache is not None:
            ids = idx.float().view(B, 1, T, 1).expand(B, 1, T, 4)
            keys, _ = kv_cache.insert(0, ids, ids)
            kv_cache.pos += T
            rows = keys[:, 0, :, 0].long().tolist()
        logits = torch.zeros(B, T, self.config.vocab_size)
        for b, row in enumerate(rows):
            offset = len(row) - T  # position of idx[b, 0] in the row
            for prompt, answer in self.script.items():
                if tuple(row[:len(prompt)]) != prompt:
                    continue
                for t in range(T):
                    k = offset + t - (len(prompt) - 1)  # answer token predicted at this position
                    if 0 <= k < len(answer):
                        logits[b, t, answer[k]] = 10.0
        if positions is not None:
            return logits[torch.arange(B), positions].unsqueeze(1)
        return logits[:, -1:] if last_only else logits


def scripted(tokenizer, tasks_and_answers):
    """A ScriptedModel answering each task's problems with answer_fn(conversation) -> text."""
    script = {}
    for task, answer_fn in tasks_and_answers:
        for i in range(len(task)):
            conversation = task[i]
            script[tuple(tokenizer.render_for_completion(conversation))] = tokenizer.encode(answer_fn(conversation))
    return ScriptedModel(tokenizer.get_vocab_size(), script, tokenizer.encode_special("<|assistant_end|>"))


def right(conversation):
    return conversation["messages"][-1]["content"]


def wrong_letter(conversation):
    return LETTERS[(LETTERS.index(right(conversation)) + 1) % 4]


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def test_always_right_scores_one_and_never_right_scores_zero(tokenizer):
    choice, answer = ChoiceTask(11), AnswerTask(5)
    model = scripted(tokenizer, [(choice, right), (answer, right)])
    engine = Engine(model, tokenizer)
    assert run_chat_eval(choice, tokenizer, model, engine, batch_size=4) == (1.0, 11)
    assert model.forward_batch_sizes[:3] == [4, 4, 3]  # batched, the last batch partial
    assert run_chat_eval(answer, tokenizer, model, engine, max_new_tokens=8) == (1.0, 5)

    model = scripted(tokenizer, [(choice, wrong_letter), (answer, lambda c: right(c) + "0")])
    engine = Engine(model, tokenizer)
    assert run_chat_eval(choice, tokenizer, model, engine, batch_size=4) == (0.0, 11)
    assert run_chat_eval(answer, tokenizer, model, engine, max_new_tokens=8) == (0.0, 5)


def test_categorical_only_ranks_the_allowed_letters(tokenizer):
    """A model whose top token is not a letter still answers with the best allowed letter."""
    choice = ChoiceTask(6)
    vocab = tokenizer.get_vocab_size()

    class PrefersQ(ScriptedModel):
        def forward(self, idx, targets=None, kv_cache=None, positions=None):
            logits = super().forward(idx, positions=positions)
            logits[:, :, tokenizer.encode("Q")[0]] = 100.0  # not an answer letter: ignored
            return logits

    model = PrefersQ(vocab, {tuple(tokenizer.render_for_completion(choice[i])): tokenizer.encode(right(choice[i]))
                             for i in range(len(choice))}, tokenizer.encode_special("<|assistant_end|>"))
    assert run_categorical_eval(choice, tokenizer, model, batch_size=3) == (1.0, 6)


def test_max_problems_and_pass_at_k(tokenizer):
    answer = AnswerTask(6)
    model = scripted(tokenizer, [(answer, right)])
    engine = Engine(model, tokenizer)
    assert run_generative_eval(answer, tokenizer, engine, max_new_tokens=8, max_problems=2) == (1.0, 2)
    assert run_generative_eval(answer, tokenizer, engine, num_samples=3, max_new_tokens=8, temperature=1.0) == (1.0, 6)


def test_chatcore_arithmetic():
    assert ALL_TASKS == ["ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee"]
    assert [BASELINE_ACCURACY[t] for t in ALL_TASKS] == [0.25, 0.25, 0.25, 0.0, 0.0, 0.0]
    assert centered_accuracy("MMLU", 0.25) == 0.0 and centered_accuracy("MMLU", 1.0) == 1.0
    assert centered_accuracy("ARC-Easy", 0.0) == pytest.approx(-1 / 3)
    assert centered_accuracy("GSM8K", 0.3) == pytest.approx(0.3)
    assert chatcore({t: 1.0 for t in ALL_TASKS}) == 1.0
    assert chatcore({t: 0.0 for t in ALL_TASKS}) == pytest.approx((3 * (-1 / 3) + 3 * 0) / 6)  # below 0
    assert chatcore({t: BASELINE_ACCURACY[t] for t in ALL_TASKS}) == 0.0  # chance level
    mixed = {"ARC-Easy": 0.55, "ARC-Challenge": 0.4, "MMLU": 0.31, "GSM8K": 0.05, "HumanEval": 0.08, "SpellingBee": 0.9}
    expected = ((0.55 - 0.25) / 0.75 + (0.4 - 0.25) / 0.75 + (0.31 - 0.25) / 0.75 + 0.05 + 0.08 + 0.9) / 6
    assert chatcore(mixed) == pytest.approx(expected)
    assert chatcore({t: 1.0 for t in ALL_TASKS[:5]}) is None  # only with all six tasks, as in the reference


def test_scripted_model_through_the_six_task_slots(tokenizer):
    """The ChatCORE of a perfect scripted model is 1 and of an always-wrong one -1/6."""
    tasks = {name: (ChoiceTask(5, seed=i) if BASELINE_ACCURACY[name] else AnswerTask(3))
             for i, name in enumerate(ALL_TASKS)}
    for answer_fn, wrong_answer, expected in ((right, right, 1.0), (wrong_letter, lambda c: "nope", -1 / 6)):
        model = scripted(tokenizer, [(t, answer_fn if t.eval_type == "categorical" else wrong_answer)
                                     for t in tasks.values()])
        engine = Engine(model, tokenizer)
        accuracies = {name: run_chat_eval(t, tokenizer, model, engine, batch_size=2, max_new_tokens=6)[0]
                      for name, t in tasks.items()}
        assert chatcore(accuracies) == pytest.approx(expected)


def _two_rank_worker(rank, world_size, init_file, queue):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    tokenizer = make_tokenizer()
    choice, answer = ChoiceTask(7), AnswerTask(5)
    # right on even problems only: 4 of 7 and 3 of 5, whichever rank gets which
    number = lambda c, word: int(c["messages"][0]["content"].split()[word][:-1])  # the problem's index
    model = scripted(tokenizer, [(choice, lambda c: right(c) if number(c, -1) % 2 == 0 else wrong_letter(c)),
                                 (answer, lambda c: right(c) if number(c, 1) % 2 == 0 else "no")])
    engine = Engine(model, tokenizer)
    results = (run_categorical_eval(choice, tokenizer, model, batch_size=2),
               run_generative_eval(answer, tokenizer, engine, max_new_tokens=6, progress=False))
    queue.put((rank, results))
    dist.barrier()  # leave together: a rank exiting while the other still talks to it can abort in gloo
    dist.destroy_process_group()


@pytest.mark.slow
def test_problems_split_across_two_ranks(run_two_ranks):
    results = run_two_ranks(_two_rank_worker)
    assert results[0] == results[1]
    (choice_acc, choice_total), (answer_acc, answer_total) = results[0]
    assert (choice_total, answer_total) == (7, 5)
    assert choice_acc == pytest.approx(4 / 7) and answer_acc == pytest.approx(3 / 5)
