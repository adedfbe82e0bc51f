"""
ARC (AI2 Reasoning Challenge): grade-school science questions with 3-5 lettered choices.
https://huggingface.co/datasets/allenai/ai2_arc
"""

from tasks.common import Task, render_mc
from tasks.data import load_split


class ARC(Task):
    eval_type = "categorical"

    def __init__(self, subset, split, **kwargs):
        super().__init__(**kwargs)
        if subset not in ("ARC-Easy", "ARC-Challenge") or split not in ("train", "validation", "test"):
            raise ValueError(f"ARC needs subset ARC-Easy|ARC-Challenge and split train|validation|test, "
                             f"got {subset}/{split}")
        self.ds = load_split("allenai/ai2_arc", subset, split)

    def num_examples(self):
        return len(self.ds)

    def get_example(self, index):
        row = self.ds[index]
        letters = row["choices"]["label"]  # usually A-D, some rows use 1-4
        if row["answerKey"] not in letters:
            raise ValueError(f"ARC row {index}: answer {row['answerKey']!r} is not one of {letters}")
        return {
            "messages": [
                {"role": "user", "content": render_mc(row["question"], letters, row["choices"]["text"])},
                {"role": "assistant", "content": row["answerKey"]},
            ],
            "letters": letters,  # evaluation picks the most likely of these letters
        }

    def evaluate(self, conversation, completion):
        return completion == conversation["messages"][-1]["content"]
