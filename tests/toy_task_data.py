"""
Tiny stand-ins for every task set the chat stages read, generated from a seed, in the layout that
NANOCHAT_TASKS_URL serves (<org>/<name>/<config>/<split>/0000.parquet, the hub's columns), plus a word list
and identity conversations. For tests and GPU checks that must not touch the network or the shared demo data.

    python tests/toy_task_data.py OUT_DIR [--long]   # then NANOCHAT_TASKS_URL=file://OUT_DIR etc.

--long makes the SmolTalk conversations hundreds of words long, so that SFT rows have a realistic length.
"""

import json
import os
import random
import sys

import pyarrow as pa
import pyarrow.parquet as pq

WORDS = ["apple", "river", "stone", "cloud", "seven", "tiger", "lemon", "house", "green", "paper", "music", "bread"]


def write_parquet(root, repo, config, split, rows):
    path = os.path.join(root, repo, config, split, "0000.parquet")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def write_task_data(root, rng, long=False):
    """Tiny versions of every set the chat stages read, with the hub's columns."""
    def sentence(n):
        return " ".join(rng.choice(WORDS) for _ in range(n))

    for subset in ("ARC-Easy", "ARC-Challenge"):
        for split, n in (("train", 12), ("validation", 4), ("test", 8)):
            write_parquet(root, "allenai/ai2_arc", subset, split, [
                {"id": f"{subset}-{split}-{i}", "question": sentence(5) + "?",
                 "choices": {"text": [sentence(2) for _ in range(4)], "label": ["A", "B", "C", "D"]},
                 "answerKey": rng.choice("ABCD")} for i in range(n)])
    mmlu_row = lambda: {"question": sentence(6) + "?", "subject": "toy", "choices": [sentence(2) for _ in range(4)],
                        "answer": rng.randint(0, 3)}
    write_parquet(root, "cais/mmlu", "all", "test", [mmlu_row() for _ in range(10)])
    write_parquet(root, "cais/mmlu", "all", "dev", [mmlu_row() for _ in range(4)])
    write_parquet(root, "cais/mmlu", "auxiliary_train", "train", [{"train": mmlu_row()} for _ in range(12)])

    def gsm8k_row():
        a, b = rng.randint(2, 20), rng.randint(2, 20)
        return {"question": f"{sentence(4)} {a} and {b}?",
                "answer": f"{sentence(3)} <<{a}*{b}={a * b}>>{a * b}.\n#### {a * b}"}
    for split, n in (("train", 12), ("test", 6)):
        write_parquet(root, "openai/gsm8k", "main", split, [gsm8k_row() for _ in range(n)])
    write_parquet(root, "openai/openai_humaneval", "openai_humaneval", "test", [
        {"task_id": f"HumanEval/{i}", "prompt": f"def f{i}(x):\n    \"\"\"{sentence(3)}\"\"\"\n",
         "canonical_solution": f"    return x + {i}\n",
         "test": f"def check(candidate):\n    assert candidate(1) == {1 + i}\n",
         "entry_point": f"f{i}"} for i in range(4)])

    def smoltalk_row():
        messages = []
        if rng.random() < 0.3:
            messages.append({"content": sentence(4), "role": "system"})
        for _ in range(rng.randint(1, 3)):
            messages += [{"content": sentence(rng.randint(3, 9)), "role": "user"},
                         {"content": sentence(rng.randint(100, 600) if long else rng.randint(3, 12)),
                          "role": "assistant"}]
        return {"messages": messages, "source": "toy"}
    for split, n in (("train", 200 if long else 20), ("test", 50 if long else 8)):
        write_parquet(root, "HuggingFaceTB/smol-smoltalk", "default", split, [smoltalk_row() for _ in range(n)])
    with open(os.path.join(root, "words_alpha.txt"), "w") as f:
        f.write("\n".join(WORDS + [w + "s" for w in WORDS]) + "\n")
    with open(os.path.join(root, "identity_conversations.jsonl"), "w") as f:
        for _ in range(6):
            f.write(json.dumps([{"role": "user", "content": "who are you?"},
                                {"role": "assistant", "content": "I am nanochat, " + sentence(4)}]) + "\n")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit("usage: python tests/toy_task_data.py OUT_DIR [--long]")
    write_task_data(sys.argv[1], random.Random(0), long="--long" in sys.argv[2:])
    print(f"Toy task data in {sys.argv[1]}: NANOCHAT_TASKS_URL=file://{os.path.abspath(sys.argv[1])}")
