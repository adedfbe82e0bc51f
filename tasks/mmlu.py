"""
MMLU: four-choice questions on 57 subjects. "all" has the test/dev/validation splits; "auxiliary_train"
(multiple-choice questions from other datasets) is what midtraining learns the format from.
https://huggingface.co/datasets/cais/mmlu
"""

from tasks.common import Task, render_mc
from tasks.data import load_split


class MMLU(Task):
    eval_type = "categorical"
    letters = ("A", "B", "C", "D")

    def __init__(self, subset, split, **kwargs):
        super().__init__(**kwargs)
        if ((subset, split) != ("auxiliary_train", "train")
                and (subset != "all" or split not in ("test", "dev", "validation"))):
            raise ValueError(f"MMLU has all/test|dev|validation and auxiliary_train/train, got {subset}/{split}")
        self.subset = subset
        self.ds = load_split("cais/mmlu", subset, split)

    def num_examples(self):
        return len(self.ds)

    def get_example(self, index):
        row = self.ds[index]
        if self.subset == "auxiliary_train":
            row = row["train"]  # on the hub these rows are wrapped in a one-field struct
        if len(row["choices"]) != 4:
            raise ValueError(f"MMLU row {index} has {len(row['choices'])} choices, expected 4")
        return {
            "messages": [
                {"role": "user", "content": render_mc(row["question"], self.letters, row["choices"])},
                {"role": "assistant", "content": self.letters[row["answer"]]},
            ],
            "subject": row["subject"],  # for per-subject scores
            "letters": self.letters,
        }

    def evaluate(self, conversation, completion):
        return completion == conversation["messages"][-1]["content"]
