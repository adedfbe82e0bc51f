"""
Tasks: a tiny hub-style parquet folder served over local HTTP through NANOCHAT_TASKS_URL; downloads happen
once; the same index gives the same example after a reload; row order is the reference's seed-42 shuffle;
slicing, mixtures and sequences; GSM8K's calculator parts and answer extraction; each task's evaluate.
"""

import json
import os
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat.tokenizer import RustBPETokenizer
from tasks.arc import ARC
from tasks.common import Task, TaskMixture, TaskSequence, render_mc
from tasks.customjson import CustomJSON, identity_conversations_path
from tasks.gsm8k import GSM8K, extract_answer, solution_parts
from tasks.humaneval import HumanEval, extract_imports, extract_program
from tasks.mmlu import MMLU
from tasks.smoltalk import SmolTalk
from tasks.spellingbee import SpellingBee, SimpleSpelling

WORDS = ["apple", "strawberry", "river", "banana", "kayak", "letter", "mississippi", "zebra"]


def arc_rows(n):
    return [{"id": f"q{i}", "question": f"Question {i}?",
             "choices": {"text": [f"w{i}", f"x{i}", f"y{i}", f"z{i}"],
                         "label": ["A", "B", "C", "D"] if i % 3 else ["1", "2", "3", "4"]},
             "answerKey": ("ABCD" if i % 3 else "1234")[i % 4]} for i in range(n)]


def mmlu_row(i):
    return {"question": f"MMLU {i}?", "subject": "anatomy", "choices": [f"c{i}{k}" for k in range(4)], "answer": i % 4}


def gsm_row(i):
    return {"question": f"Tom has {i} apples and buys {i + 2}. How many?",
            "answer": f"He has {i}+{i + 2} = <<{i}+{i + 2}={2 * i + 2}>>{2 * i + 2} apples.\n#### {2 * i + 2:,}"}


def smoltalk_row(i):
    messages = [{"content": f"hello {i}", "role": "user"}, {"content": f"hi {i}", "role": "assistant"}]
    if i % 2:
        messages.insert(0, {"content": "be nice", "role": "system"})
    return {"messages": messages, "source": "test"}


def write_split(root, repo, config, split, rows, shard=0):
    path = os.path.join(root, repo, config, split, f"{shard:04d}.parquet")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


@pytest.fixture
def hub(file_server, base_dir, monkeypatch):
    """The served folder holds small versions of every dataset; the NANOCHAT_*_URL variables point at it."""
    root = file_server.root
    write_split(root, "allenai/ai2_arc", "ARC-Easy", "train", arc_rows(30))
    write_split(root, "cais/mmlu", "all", "test", [mmlu_row(i) for i in range(20)])
    write_split(root, "cais/mmlu", "auxiliary_train", "train", [{"train": mmlu_row(i)} for i in range(12)])
    write_split(root, "openai/gsm8k", "main", "train", [gsm_row(i) for i in range(0, 10)])
    # a split in two shards
    write_split(root, "openai/gsm8k", "main", "train", [gsm_row(i) for i in range(10, 25)], shard=1)
    write_split(root, "HuggingFaceTB/smol-smoltalk", "default", "train", [smoltalk_row(i) for i in range(16)])
    write_split(root, "openai/openai_humaneval", "openai_humaneval", "test", [
        {"task_id": "HumanEval/0",
         "prompt": 'from typing import List\n\n\ndef total(xs: List[int]) -> int:\n    """Sum of xs."""\n',
         "canonical_solution": "    return sum(xs)\n", "entry_point": "total",
         "test": "def check(candidate):\n    assert candidate([1, 2]) == 3\n    assert candidate([]) == 0\n"},
        {"task_id": "HumanEval/1", "prompt": 'import math\n\ndef root(x):\n    """Square root."""\n',
         "canonical_solution": "    return math.sqrt(x)\n", "entry_point": "root",
         "test": "def check(candidate):\n    assert candidate(9) == 3\n"},
    ])
    with open(os.path.join(root, "words.txt"), "w") as f:
        f.write("\n".join(WORDS) + "\n")
    with open(os.path.join(root, "identity.jsonl"), "w") as f:
        for i in range(5):
            conversation = [{"role": "user", "content": f"who are you {i}"},
                            {"role": "assistant", "content": "nanochat"}]
            f.write(json.dumps(conversation) + "\n")
    monkeypatch.setenv("NANOCHAT_TASKS_URL", file_server.url)
    monkeypatch.setenv("NANOCHAT_WORDS_URL", f"{file_server.url}/words.txt")
    monkeypatch.setenv("NANOCHAT_IDENTITY_URL", f"{file_server.url}/identity.jsonl")
    return file_server


def make_all():
    return {
        "arc": ARC("ARC-Easy", "train"), "mmlu": MMLU("all", "test"), "aux": MMLU("auxiliary_train", "train"),
        "gsm8k": GSM8K("main", "train"), "smoltalk": SmolTalk("train"),
        "identity": CustomJSON(identity_conversations_path()),
        "bee": SpellingBee(size=20), "spell": SimpleSpelling(size=20, split="test"),
    }


def test_downloaded_once_and_same_examples_after_reload(hub, base_dir):
    first = make_all()
    examples = {name: [task[i] for i in range(len(task))] for name, task in first.items()}
    requested = list(hub.requests)
    assert requested.count("openai/gsm8k/main/train/0001.parquet") == 1  # the second shard was found...
    assert requested.count("openai/gsm8k/main/train/0002.parquet") == 1  # ...and the probe past it said "no more"
    assert len(first["gsm8k"]) == 25
    second = make_all()
    assert hub.requests == requested  # nothing fetched again
    assert {name: [task[i] for i in range(len(task))] for name, task in second.items()} == examples
    assert os.path.exists(base_dir / "task_data" / "allenai/ai2_arc/ARC-Easy/train/0000.parquet")


def test_row_order_is_the_seed_42_shuffle_of_the_hub_order(hub):
    # datasets' shuffle(seed=42) takes np.random.default_rng(42).permutation: pinned here so index i stays the
    # reference's
    task = ARC("ARC-Easy", "train")
    permutation = np.random.default_rng(42).permutation(30)
    rows = arc_rows(30)
    assert [task[i]["messages"][0]["content"] for i in range(30)] == \
           [render_mc(rows[j]["question"], rows[j]["choices"]["label"], rows[j]["choices"]["text"])
            for j in permutation]
    gsm8k = GSM8K("main", "train")
    assert sorted(int(gsm8k[i]["messages"][0]["content"].split()[2]) for i in range(25)) == list(range(25))


def test_conversations_have_the_reference_shape(hub):
    tasks = make_all()
    arc = tasks["arc"][0]
    assert arc["messages"][1]["content"] in arc["letters"]
    assert arc["messages"][0]["content"].startswith("Multiple Choice question: ")
    aux = tasks["aux"][3]
    assert aux["letters"] == ("A", "B", "C", "D") and aux["messages"][1]["content"] in "ABCD"
    assert aux["subject"] == "anatomy"
    gsm = tasks["gsm8k"][0]["messages"][1]["content"]
    assert [part["type"] for part in gsm] == ["text", "python", "python_output", "text"]
    with_system = [tasks["smoltalk"][i] for i in range(16) if tasks["smoltalk"][i]["messages"][0]["role"] == "system"]
    assert len(with_system) == 8  # kept as is: rendering merges it into the first user message
    bee = tasks["bee"][0]["messages"]
    word, letter = bee[1]["content"][2]["text"].split("'")[1], bee[1]["content"][2]["text"].split("'")[3]
    assert word in WORDS and bee[1]["content"][3]["text"] == str(word.count(letter))
    word, letters = tasks["spell"][0]["messages"][1]["content"].split(":")
    assert word in WORDS and letters.split(",") == list(word)
    # every example renders, and the assistant has something to learn
    tok = RustBPETokenizer.train_from_iterator(iter(["Multiple Choice question apples spell count " * 50]),
                                               vocab_size=256 + 9 + 16)
    for task in tasks.values():
        for i in range(len(task)):
            ids, mask = tok.render_conversation(task[i])
            assert sum(mask) > 0


def test_slicing_and_indexing():
    class Numbers(Task):
        def num_examples(self):
            return 10

        def get_example(self, index):
            return index

    assert [Numbers()[i] for i in range(len(Numbers()))] == list(range(10))
    view = Numbers(start=2, stop=9, step=3)
    assert len(view) == 3 and [view[i] for i in range(3)] == [2, 5, 8]
    assert list(Numbers(start=4, step=4)) == [4, 8]  # iteration stops at the IndexError
    assert len(Numbers(start=5, stop=50)) == 5  # stop past the end is clamped
    with pytest.raises(IndexError):
        view[3]
    with pytest.raises(ValueError):
        Numbers(start=5, stop=2)

    mixture = TaskMixture([Numbers(stop=3), Numbers(stop=5), Numbers(stop=3)])
    order = [mixture[i] for i in range(len(mixture))]
    again = TaskMixture([Numbers(stop=3), Numbers(stop=5), Numbers(stop=3)])
    assert order == [again[i] for i in range(11)]  # deterministic
    assert sorted(order) == sorted([0, 1, 2] * 2 + [0, 1, 2, 3, 4]) and order != sorted(order)
    pairs = [(0, 0), (0, 1), (0, 2)] + [(1, i) for i in range(5)] + [(2, 0), (2, 1), (2, 2)]
    random.Random(42).shuffle(pairs)  # the reference's mixing order, so mixture index i is the reference's
    assert mixture.index_map == pairs
    sequence = TaskSequence([Numbers(stop=2), Numbers(start=7)])
    assert [sequence[i] for i in range(len(sequence))] == [0, 1, 7, 8, 9]


def test_gsm8k_answers_and_calculator_parts():
    assert extract_answer("so the answer is\n#### 1,234") == "1234"
    assert extract_answer("#### -3.5 dollars") == "-3.5"
    assert extract_answer("the answer is 12") is None
    parts = solution_parts("Half is 10/2 = <<10/2=5>>5 each, and <<5*3>> makes it.\n#### 15")
    assert parts == [{"type": "text", "text": "Half is 10/2 = "}, {"type": "python", "text": "10/2"},
                     {"type": "python_output", "text": "5"}, {"type": "text", "text": "5 each, and "},
                     {"type": "python", "text": "5*3"}, {"type": "python_output", "text": ""},
                     {"type": "text", "text": " makes it.\n#### 15"}]


def test_evaluate_correct_and_incorrect(hub):
    tasks = make_all()
    for name in ("arc", "mmlu", "aux"):
        conversation = tasks[name][1]
        answer = conversation["messages"][-1]["content"]
        wrong = next(letter for letter in conversation["letters"] if letter != answer)
        assert tasks[name].eval_type == "categorical"
        assert tasks[name].evaluate(conversation, answer) and not tasks[name].evaluate(conversation, wrong)
    gsm = tasks["gsm8k"][0]
    truth = extract_answer(gsm["messages"][-1]["content"][-1]["text"])
    assert tasks["gsm8k"].evaluate(gsm, f"Let me think.\n#### {truth}") == 1
    assert tasks["gsm8k"].evaluate(gsm, f"#### {int(truth) + 1}") == 0 and tasks["gsm8k"].evaluate(gsm, truth) == 0
    bee = tasks["bee"][4]
    count = bee["messages"][1]["content"][3]["text"]
    assert tasks["bee"].evaluate(bee, f"#### {count}") == 1
    assert tasks["bee"].evaluate(bee, f"#### {int(count) + 1}") == 0
    spell = tasks["spell"][2]
    assert tasks["spell"].evaluate(spell, spell["messages"][1]["content"] + "\n") == 1
    assert tasks["spell"].evaluate(spell, "a:a") == 0
    for name in ("smoltalk", "identity"):
        assert tasks[name].eval_type is None
        with pytest.raises(NotImplementedError, match="training only"):
            tasks[name].evaluate(tasks[name][0], "hi")


def test_spelling_train_and_test_differ_and_repeat(hub):
    train, test = SpellingBee(size=50), SpellingBee(size=50, split="test")
    assert [train[i] for i in range(50)] == [SpellingBee(size=50)[i] for i in range(50)]
    assert [train[i] for i in range(50)] != [test[i] for i in range(50)]


def test_damaged_download_is_removed_and_retried(hub, base_dir):
    hub.faults["allenai/ai2_arc/ARC-Easy/train/0000.parquet"] = ["short"]  # complete-looking but half a file
    with pytest.raises(RuntimeError, match="not a readable parquet file"):
        ARC("ARC-Easy", "train")
    assert not os.path.exists(base_dir / "task_data/allenai/ai2_arc/ARC-Easy/train/0000.parquet")
    assert len(ARC("ARC-Easy", "train")) == 30


def test_missing_source_says_what_to_set(hub):
    with pytest.raises(RuntimeError, match="NANOCHAT_TASKS_URL"):
        ARC("ARC-Challenge", "train")  # not served
    with pytest.raises(ValueError, match="subset"):
        ARC("ARC-Hard", "train")


def test_custom_json_bad_line_names_it(tmp_path):
    path = tmp_path / "conversations.jsonl"
    path.write_text('[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]\n\n'
                    '[{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]\n')
    with pytest.raises(ValueError, match=r"conversations.jsonl:3: message 1 is from 'user'"):
        CustomJSON(str(path))
    path.write_text('[{"role": "user", "content": "a"}]\n')
    with pytest.raises(ValueError, match=":1: expected a JSON list of at least one user message"):
        CustomJSON(str(path))


def test_humaneval_runs_completions_against_the_tests(hub):
    task = HumanEval()
    assert len(task) == 2 and task.eval_type == "generative"
    for conversation in (task[0], task[1]):
        canonical = conversation["messages"][1]["content"]  # prompt + canonical solution
        assert task.evaluate(conversation, canonical)
        # the usual model output: a fenced block without the prompt's imports, with chatter around it
        body = "\n".join(line for line in canonical.splitlines() if not line.startswith(("import ", "from ")))
        assert task.evaluate(conversation, f"Here you go:\n```python\n{body}\n```\nDone.")
        assert not task.evaluate(conversation, canonical.replace("return", "return -1 + "))
    assert extract_program("x = 1") == "x = 1"
    assert extract_imports("import a\nfrom b import c\n\ndef f(): pass") == "import a\nfrom b import c"
