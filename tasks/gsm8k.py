"""
GSM8K: grade-school math word problems with worked solutions. A solution marks each calculation as
<<expression=result>> and ends with "#### answer"; the markers become calculator calls (python parts whose
output the tool supplies), so the model learns to use the Engine's calculator.
https://huggingface.co/datasets/openai/gsm8k
"""

import re

from tasks.common import Task
from tasks.data import load_split

ANSWER_RE = re.compile(r"#### (\-?[0-9\.\,]+)")
CALCULATION_RE = re.compile(r"(<<[^>]+>>)")


def extract_answer(text):
    """The number after '####' without thousands separators ("1,000" -> "1000"), or None (the official rule)."""
    match = ANSWER_RE.search(text)
    return match.group(1).strip().replace(",", "") if match else None


def solution_parts(solution):
    """A GSM8K solution as assistant parts: text, then for each <<a=b>> a python part "a" and its output "b"."""
    parts = []
    for piece in CALCULATION_RE.split(solution):
        if piece.startswith("<<") and piece.endswith(">>"):
            inner = piece[2:-2]
            expression, result = inner.rsplit("=", 1) if "=" in inner else (inner, "")
            parts += [{"type": "python", "text": expression}, {"type": "python_output", "text": result}]
        else:
            parts.append({"type": "text", "text": piece})
    return parts


class GSM8K(Task):
    eval_type = "generative"

    def __init__(self, subset, split, **kwargs):
        super().__init__(**kwargs)
        if subset not in ("main", "socratic") or split not in ("train", "test"):
            raise ValueError(f"GSM8K needs subset main|socratic and split train|test, got {subset}/{split}")
        self.ds = load_split("openai/gsm8k", subset, split)

    def num_examples(self):
        return len(self.ds)

    def get_example(self, index):
        row = self.ds[index]
        return {"messages": [
            {"role": "user", "content": row["question"]},
            {"role": "assistant", "content": solution_parts(row["answer"])},
        ]}

    def evaluate(self, conversation, completion):
        """1 if the completion's '#### number' equals the reference solution's, else 0."""
        reference = extract_answer(conversation["messages"][-1]["content"][-1]["text"])  # the final text part
        return int(extract_answer(completion) == reference)
