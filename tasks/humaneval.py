"""
HumanEval: 164 Python functions to complete from a signature and docstring, graded by running their unit
tests (in the sandbox of nanochat/execution.py).
https://huggingface.co/datasets/openai/openai_humaneval
"""

import re

from tasks.common import Task
from tasks.data import load_split

CODE_BLOCK_RE = re.compile(r"```(?:python)?\s*\n(.*?)\n```", re.DOTALL)


def extract_imports(prompt):
    """The import lines at the top of a prompt (completions often drop them but still need them)."""
    imports = []
    for line in prompt.split("\n"):
        line = line.strip()
        if line.startswith(("import ", "from ")):
            imports.append(line)
        elif line and not line.startswith("#"):
            break
    return "\n".join(imports)


def extract_program(completion):
    """The first ```python fenced block of a completion if it has one, else the whole completion."""
    blocks = CODE_BLOCK_RE.findall(completion)
    return (blocks[0] if blocks else completion).strip()


class HumanEval(Task):
    eval_type = "generative"

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.ds = load_split("openai/openai_humaneval", "openai_humaneval", "test")

    def num_examples(self):
        return len(self.ds)

    def get_example(self, index):
        row = self.ds[index]
        return {
            "messages": [
                {"role": "user", "content": row["prompt"]},
                {"role": "assistant", "content": f"{row['prompt']}\n{row['canonical_solution']}"},
            ],
            "entry_point": row["entry_point"],  # the function the tests call
            "test": row["test"],  # defines check(candidate)
        }

    def evaluate(self, conversation, completion):
        """
        True if the completion's program passes the problem's tests. The program runs in the sandbox; the tests run
        outside it, calling its function with plain data (nanochat/execution.py), so the program cannot fake a pass.
        """
        from nanochat.execution import execute_code
        prompt = conversation["messages"][0]["content"]
        program = "\n\n".join([extract_imports(prompt), extract_program(completion)])
        return execute_code(program, test=conversation["test"], entry_point=conversation["entry_point"],
                            test_setup=prompt).success
