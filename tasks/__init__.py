"""Chat tasks: conversations to train on and problems to evaluate, one file per dataset (see common.py)."""


def load_eval_task(name):
    """The evaluation split of a chat task by its name in nanochat.chat_eval.ALL_TASKS (downloaded on first use)."""
    if name in ("ARC-Easy", "ARC-Challenge"):
        from tasks.arc import ARC
        return ARC(subset=name, split="test")
    if name == "MMLU":
        from tasks.mmlu import MMLU
        return MMLU(subset="all", split="test")
    if name == "GSM8K":
        from tasks.gsm8k import GSM8K
        return GSM8K(subset="main", split="test")
    if name == "HumanEval":
        from tasks.humaneval import HumanEval
        return HumanEval()
    if name == "SpellingBee":
        from tasks.spellingbee import SpellingBee
        return SpellingBee(size=256, split="test")
    raise ValueError(f"unknown task {name!r}: choose from ARC-Easy, ARC-Challenge, MMLU, GSM8K, HumanEval, SpellingBee")
