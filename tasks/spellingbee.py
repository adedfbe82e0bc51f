"""
Spelling and letter counting, generated from an English word list (370K words).

SpellingBee: "How many r are in strawberry?" answered by spelling the word out, counting by hand, then
checking with a python call, ending with "#### 3" (graded like GSM8K). Counting letters is hard for an LLM
because it sees tokens, not characters. SimpleSpelling drills just that part ("Spell the word: apple" ->
"apple:a,p,p,l,e"), over-represented in midtraining so that small models learn it.

Example i is drawn from random.Random(i) (test split: Random(-(i + 1))), so the same index always gives the
same conversation, here and in the reference.
"""

import random

from tasks.common import Task
from tasks.data import download_task_file, WORDS_URL
from tasks.gsm8k import extract_answer

LETTERS = "abcdefghijklmnopqrstuvwxyz"

# Ways of asking, several languages; the reference's list, in its order (random choices index into it).
QUESTION_TEMPLATES = [
    "How many {letter} are in the word {word}", "How many {letter} are in {word}",
    "Count the number of {letter} in {word}", "How many times does {letter} appear in {word}",
    "What's the count of {letter} in {word}", "In the word {word}, how many {letter} are there",
    "How many letter {letter} are in the word {word}", "Count how many {letter} appear in {word}",
    "Tell me the number of {letter} in {word}", "How many occurrences of {letter} are in {word}",
    "Find the count of {letter} in {word}", "Can you count the {letter} letters in {word}",
    "What is the frequency of {letter} in {word}", "How many {letter}s are in {word}",
    "How many {letter}'s are in {word}", "Count all the {letter} in {word}",
    "How many times is {letter} in {word}", "Number of {letter} in {word}",
    "Total count of {letter} in {word}", "How many {letter} does {word} have",
    "How many {letter} does {word} contain", "What's the number of {letter} in {word}",
    "{word} has how many {letter}", "In {word}, count the {letter}",
    "How many {letter} appear in {word}", "Count the {letter} in {word}",
    "Give me the count of {letter} in {word}", "How many instances of {letter} in {word}",
    "Show me how many {letter} are in {word}", "Calculate the number of {letter} in {word}",
    "¿Cuántas {letter} hay en {word}?", "¿Cuántas veces aparece {letter} en {word}?",
    "Cuenta las {letter} en {word}", "¿Cuántas letras {letter} tiene {word}?",
    "{word}中有多少个{letter}", "{word}里有几个{letter}", "数一下{word}中的{letter}", "{word}这个词里有多少{letter}",
    "{word}에 {letter}가 몇 개 있나요", "{word}에서 {letter}의 개수는", "{word}에 {letter}가 몇 번 나오나요",
    "{word}라는 단어에 {letter}가 몇 개",
    "Combien de {letter} dans {word}", "Combien de fois {letter} apparaît dans {word}",
    "Compte les {letter} dans {word}",
    "Wie viele {letter} sind in {word}", "Wie oft kommt {letter} in {word} vor", "Zähle die {letter} in {word}",
    "{word}に{letter}は何個ありますか", "{word}の中に{letter}がいくつ", "{word}に{letter}が何回出てくる",
]
QUOTES = ["", "'", '"']


def load_words():
    with open(download_task_file("NANOCHAT_WORDS_URL", WORDS_URL, "words_alpha.txt"), encoding="utf-8") as f:
        return [line.strip() for line in f]


class SpellingTask(Task):
    """size generated examples; train and test draw from disjoint seeds."""
    eval_type = "generative"

    def __init__(self, size=1000, split="train", **kwargs):
        super().__init__(**kwargs)
        if split not in ("train", "test"):
            raise ValueError(f"{type(self).__name__} split must be train|test, got {split}")
        self.size, self.split = size, split
        self.words = load_words()

    def num_examples(self):
        return self.size

    def rng(self, index):
        return random.Random(index if self.split == "train" else -(index + 1))  # -(i + 1): test never reuses seed 0


class SpellingBee(SpellingTask):

    def get_example(self, index):
        rng = self.rng(index)
        word = rng.choice(self.words)
        letter = rng.choice(word) if rng.random() < 0.9 else rng.choice(LETTERS)  # 10%: maybe a letter not in it
        template = rng.choice(QUESTION_TEMPLATES)
        if rng.random() < 0.3:
            template = template.lower()  # people skip the shift key
        letter_quote, word_quote = rng.choice(QUOTES), rng.choice(QUOTES)
        question = template.format(letter=f"{letter_quote}{letter}{letter_quote}",
                                   word=f"{word_quote}{word}{word_quote}")
        if rng.random() < 0.5:
            question += "?"

        # the worked answer: spell, count with a running tally, then check with python
        count = word.count(letter)
        lines = [f"We are asked to find the number '{letter}' in the word '{word}'. "
                 "Let me try a manual approach first.",
                 "", "First spell the word out:", f"{word}:{','.join(word)}", "",
                 f"Then count the occurrences of '{letter}':"]
        running = 0
        for position, char in enumerate(word, 1):
            running += char == letter
            # "3:r" with no space: " r" and "r" are different tokens, and the spelling above has no spaces
            lines.append(f"{position}:{char} hit! count={running}" if char == letter else f"{position}:{char}")
        manual = "\n".join(lines) + f"\n\nThis gives us {running}."
        parts = [
            {"type": "text", "text": manual},
            {"type": "text", "text": "\n\nLet me double check this using Python:\n\n"},
            {"type": "python", "text": f"'{word}'.count('{letter}')"},
            {"type": "python_output", "text": str(count)},
            {"type": "text", "text": f"\n\nPython gives us {count}.\n\nMy final answer is:\n\n#### {count}"},
        ]
        return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": parts}]}

    def evaluate(self, conversation, completion):
        """1 if the completion's '#### n' equals the true count, as GSM8K is graded."""
        return int(extract_answer(completion) == extract_answer(conversation["messages"][-1]["content"][-1]["text"]))


class SimpleSpelling(SpellingTask):

    def __init__(self, size=1000, split="train", **kwargs):
        super().__init__(size, split, **kwargs)
        random.Random(42).shuffle(self.words)  # its own word order, so it does not spell SpellingBee's words

    def get_example(self, index):
        word = self.rng(index).choice(self.words)
        return {"messages": [{"role": "user", "content": f"Spell the word: {word}"},
                             {"role": "assistant", "content": f"{word}:{','.join(word)}"}]}

    def evaluate(self, conversation, completion):
        return int(completion.strip() == conversation["messages"][-1]["content"])
