"""
A Task is a list of conversations ({"messages": [...], plus whatever evaluation needs}) over a dataset, with
a lightweight start/stop/step view, an eval_type and evaluate(conversation, completion). TaskMixture and
TaskSequence combine tasks for training; render_mc is the multiple-choice prompt ARC and MMLU share.
"""

import random


class Task:
    """Subclasses define num_examples() and get_example(i); index i of the view is example start + i * step."""

    eval_type = None  # "categorical" (pick one of the letters), "generative" (sample an answer) or None (training only)

    def __init__(self, start=0, stop=None, step=1):
        if start < 0 or step < 1 or (stop is not None and stop < start):
            raise ValueError(f"need 0 <= start <= stop and step >= 1, got start={start} stop={stop} step={step}")
        self.start, self.stop, self.step = start, stop, step

    def num_examples(self):
        raise NotImplementedError

    def get_example(self, index):
        raise NotImplementedError

    def __len__(self):
        stop = self.num_examples() if self.stop is None else min(self.stop, self.num_examples())
        return max(0, -(-(stop - self.start) // self.step))  # ceil((stop - start) / step)

    def __getitem__(self, index):
        if not isinstance(index, int):
            raise TypeError(f"tasks are indexed by int, got {type(index).__name__}")
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {type(self).__name__} of {len(self)} examples")
        return self.get_example(self.start + index * self.step)

    def evaluate(self, conversation, completion):
        """1 or True if the completion (an assistant reply as text) answers the conversation's problem."""
        raise NotImplementedError(f"{type(self).__name__} is for training only: it has no evaluation")

    def reward(self, conversation, completion):
        """The reinforcement-learning reward of a completion (nanochat/rl.py): 1.0 when evaluate passes it."""
        return float(self.evaluate(conversation, completion))


class TaskMixture(Task):
    """
    All examples of several tasks, in one fixed shuffled order (random.Random(42), as the reference) so every
    stretch of training sees every task. Pass a task twice to see it twice as often.
    """

    def __init__(self, tasks, **kwargs):
        super().__init__(**kwargs)
        self.tasks = tasks
        self.index_map = [(t, i) for t, task in enumerate(tasks) for i in range(len(task))]
        random.Random(42).shuffle(self.index_map)

    def num_examples(self):
        return len(self.index_map)

    def get_example(self, index):
        task_index, local_index = self.index_map[index]
        return self.tasks[task_index][local_index]


class TaskSequence(Task):
    """All examples of several tasks one task after the other (a curriculum)."""

    def __init__(self, tasks, **kwargs):
        super().__init__(**kwargs)
        self.tasks = tasks

    def num_examples(self):
        return sum(len(task) for task in self.tasks)

    def get_example(self, index):
        for task in self.tasks:
            if index < len(task):
                return task[index]
            index -= len(task)
        raise IndexError(index)


def render_mc(question, letters, choices):
    """
    The multiple-choice prompt. Each letter comes right after its choice ("- Paris=A") with no space, so the
    prompt holds the same token ("A", not " A") the assistant answers with; small models bind the two better.
    """
    lines = [f"Multiple Choice question: {question}"]
    lines += [f"- {choice}={letter}" for letter, choice in zip(letters, choices)]
    return "\n".join(lines) + "\n\nRespond only with the letter of the correct answer."
