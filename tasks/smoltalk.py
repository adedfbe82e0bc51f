"""
SmolTalk (the "smol" cut, sized for small models): general multi-turn chat, some with a system message.
https://huggingface.co/datasets/HuggingFaceTB/smol-smoltalk
"""

from nanochat.tokenizer import chat_messages
from tasks.common import Task
from tasks.data import load_split


class SmolTalk(Task):
    """Training only: open-ended replies have no automatic grade."""

    def __init__(self, split, **kwargs):
        super().__init__(**kwargs)
        if split not in ("train", "test"):
            raise ValueError(f"SmolTalk split must be train|test, got {split}")
        self.ds = load_split("HuggingFaceTB/smol-smoltalk", "default", split)

    def num_examples(self):
        return len(self.ds)

    def get_example(self, index):
        # the system message, if any, stays: rendering merges it
        conversation = {"messages": self.ds[index]["messages"]}
        try:
            if len(chat_messages(conversation)) < 2:
                raise ValueError("needs at least one user message and one assistant reply")
        except ValueError as e:
            raise ValueError(f"SmolTalk row {index}: {e}") from e
        return conversation
