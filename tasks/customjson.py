"""
Conversations from a JSONL file, one JSON list of {"role", "content"} messages per line. The identity
conversations (who nanochat is, who made it) come this way; so can any conversations of your own.
"""

import json

from nanochat.tokenizer import chat_messages
from tasks.common import Task
from tasks.data import download_task_file, IDENTITY_URL


def identity_conversations_path():
    """The identity conversations, fetched once from $NANOCHAT_IDENTITY_URL (default: the reference's file)."""
    return download_task_file("NANOCHAT_IDENTITY_URL", IDENTITY_URL, "identity_conversations.jsonl")


class CustomJSON(Task):
    """Training only. Every line is checked when the file is read, so a bad line fails at once, with its number."""

    def __init__(self, filepath, **kwargs):
        super().__init__(**kwargs)
        self.conversations = []
        with open(filepath, encoding="utf-8") as f:
            for line_number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    messages = json.loads(line)
                    if not isinstance(messages, list) or len(chat_messages({"messages": messages})) < 2:
                        raise ValueError("expected a JSON list of at least one user message and one assistant reply")
                except ValueError as e:  # json.JSONDecodeError is a ValueError too
                    raise ValueError(f"{filepath}:{line_number}: {e}") from e
                self.conversations.append(messages)

    def num_examples(self):
        return len(self.conversations)

    def get_example(self, index):
        return {"messages": self.conversations[index]}
