"""
Talking to a model: streamed text (whole UTF-8 characters, tool calls), answers rendered back into the
tokens they were written with, and scripts/chat_cli.py driven as a person uses it, through a terminal.
python -m pytest tests/test_chat.py -q
"""

import fcntl
import os
import pty
import random
import select
import signal
import subprocess
import sys
import termios
import time
from contextlib import contextmanager

import pytest

from nanochat.chat import TOOL_TOKENS, TextStream, assistant_content
from nanochat.tokenizer import RustBPETokenizer

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tokenizer(chat_base_dir):
    return RustBPETokenizer.from_directory(os.path.join(chat_base_dir, "tokenizer"))


def stream(tokenizer, ids):
    text_stream = TextStream(tokenizer)
    pieces = [text_stream.add(token) for token in ids]
    return pieces, text_stream.finish()


def test_multibyte_characters_come_out_whole(tokenizer):
    # the tokenizer learned ASCII only, so each of these characters is split over 2-4 byte tokens
    text = "naïve café, 12 × 7 = 84 🙂 日本語 done"
    ids = tokenizer.encode(text)
    assert len(ids) > len(text.encode("utf-8")) / 2  # many byte tokens: the split is really exercised
    pieces, rest = stream(tokenizer, ids)
    assert "".join(pieces) == text and rest == ""
    assert all("\ufffd" not in piece for piece in pieces)
    assert "" in pieces  # the first bytes of a split character wait for the last one


def test_stream_equals_decode_on_random_tokens(tokenizer):
    # random ids include lone bytes that are not UTF-8 at all: those come out as U+FFFD, as decode() gives them
    rng = random.Random(0)
    specials = [tokenizer.encode_special(name) for name in TOOL_TOKENS]
    for _ in range(50):
        length = rng.randrange(1, 40)
        ids = [rng.choice(specials) if rng.random() < 0.1 else rng.randrange(256 + 50) for _ in range(length)]
        pieces, rest = stream(tokenizer, ids)
        assert "".join(pieces) + rest == tokenizer.decode(ids)


def test_tool_call_streams_as_token_names_and_renders_back_to_the_same_tokens(tokenizer):
    special = tokenizer.encode_special
    answer = (tokenizer.encode("The answer is ") + [special("<|python_start|>")] + tokenizer.encode("12*7")
              + [special("<|python_end|>"), special("<|output_start|>")] + tokenizer.encode("84")
              + [special("<|output_end|>")] + tokenizer.encode(" ok"))
    pieces, _ = stream(tokenizer, answer)
    text = "".join(pieces)
    assert text == "The answer is <|python_start|>12*7<|python_end|><|output_start|>84<|output_end|> ok"
    content = assistant_content(text)
    assert content == [{"type": "text", "text": "The answer is "}, {"type": "python", "text": "12*7"},
                       {"type": "python_output", "text": "84"}, {"type": "text", "text": " ok"}]
    question = {"role": "user", "content": "what is 12*7?"}
    ids, _ = tokenizer.render_conversation({"messages": [question, {"role": "assistant", "content": content}]})
    prompt = tokenizer.render_for_completion({"messages": [question]})
    assert ids == prompt + answer + [special("<|assistant_end|>")]


def test_assistant_content_plain_and_cut_short():
    assert assistant_content("just text") == "just text"
    assert assistant_content("") == ""
    # an answer that hit its token limit inside a call keeps what was written of it
    assert assistant_content("x <|python_start|>1+") == [{"type": "text", "text": "x "},
                                                          {"type": "python", "text": "1+"}]


# -----------------------------------------------------------------------------
# chat_cli: the sft model of chat_base_dir answers every question with the calculator call 12*7


def cli_env(chat_base_dir):
    env = {**os.environ, "NANOCHAT_BASE_DIR": chat_base_dir, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("OMP_WAIT_POLICY", None)  # the CLI warns when it is PASSIVE (tested below)
    return env


CLI_ARGS = ["-t", "0", "-d", "float32", "--device-type", "cpu"]


def test_cli_one_prompt_uses_the_calculator(chat_base_dir):
    result = subprocess.run([sys.executable, "-m", "scripts.chat_cli", "-p", "What is 12 times 7?", *CLI_ARGS],
                            cwd=REPO_ROOT, env=cli_env(chat_base_dir), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "[calculator: 12*7] = 84\n"  # only the answer on stdout; loading talk goes to stderr
    assert "OMP_WAIT_POLICY" not in result.stderr
    sleeping = subprocess.run([sys.executable, "-m", "scripts.chat_cli", "-p", "What is 12 times 7?", *CLI_ARGS],
                              cwd=REPO_ROOT, env={**cli_env(chat_base_dir), "OMP_WAIT_POLICY": "passive"},
                              capture_output=True, text=True, timeout=300)
    assert sleeping.stdout == result.stdout and "OMP_WAIT_POLICY=PASSIVE" in sleeping.stderr  # said, not refused


@pytest.mark.slow
def test_cli_compiled_decoding_gives_the_same_answer(chat_base_dir):
    args = ["-p", "What is 12 times 7?", *CLI_ARGS, "-m", "24"]
    results = [subprocess.run([sys.executable, "-m", "scripts.chat_cli", *args, *mode], cwd=REPO_ROOT,
                              env=cli_env(chat_base_dir), capture_output=True, text=True, timeout=300)
               for mode in ([], ["--decode-mode", "compile"])]
    assert all(result.returncode == 0 for result in results), results[1].stderr
    assert results[1].stdout == results[0].stdout  # greedy, fp32: the same tokens; nothing else on stdout
    assert "compiling the decode step" in results[1].stderr and "decoding eagerly" not in results[1].stderr


def test_cli_missing_model_says_what_to_train(tmp_path):
    result = subprocess.run([sys.executable, "-m", "scripts.chat_cli", "-p", "hi", *CLI_ARGS], cwd=REPO_ROOT,
                            env={**os.environ, "NANOCHAT_BASE_DIR": str(tmp_path)}, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode != 0
    assert "python -m scripts.chat_sft" in result.stderr


def read_until(fd, marker, output, timeout=300):
    """Read the terminal into output (a bytearray) until marker appears (or marker(output) is true); False at EOF."""
    done = marker if callable(marker) else lambda text: marker in text
    deadline = time.time() + timeout
    while not done(output):
        assert time.time() < deadline, f"timed out waiting for {marker!r}; got:\n{output.decode(errors='replace')}"
        ready, _, _ = select.select([fd], [], [], 1.0)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # EIO: the other end closed
                return False
            if not chunk:
                return False
            output.extend(chunk)
    return True


@contextmanager
def in_terminal(args, chat_base_dir):
    """
    chat_cli in a new session whose controlling terminal is a fresh pseudo-terminal (so Ctrl-C is a SIGINT):
    yields (process, the terminal's master end); afterwards closes the terminal and kills what still runs.
    """
    def as_in_a_terminal():
        # Ctrl-C as a shell gives it: a suite started in the background (bash without job control) runs with SIGINT
        # ignored, which children inherit, and chat_cli then never saw the Ctrl-C typed here (CI from `... &`)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "scripts.chat_cli", *args], cwd=REPO_ROOT,
                            env={**cli_env(chat_base_dir), "TERM": "dumb"}, stdin=slave, stdout=slave, stderr=slave,
                            start_new_session=True, preexec_fn=as_in_a_terminal)
    os.close(slave)
    try:
        yield proc, master
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()


def test_cli_interactive_session_in_a_terminal(chat_base_dir):
    # typed into line by line as a person would: two questions, clear, one more, quit; a chat session on CPU
    # compiles its decode step while loading, before the first prompt
    with in_terminal(CLI_ARGS, chat_base_dir) as (proc, master):
        output = bytearray()
        assert read_until(master, b"You: ", output) and b"compiling the decode step" in output
        for line in ["hello there", "and what is 12*7?", "clear", "again", "quit"]:
            assert read_until(master, b"You: ", output)
            del output[: output.rindex(b"You: ") + 5]  # keep only what comes after this prompt
            os.write(master, line.encode() + b"\n")
            if line == "quit":
                read_until(master, b"Bye.", output)
                assert b"Bye." in output
            elif line == "clear":
                assert read_until(master, b"(new conversation)", output)
            else:  # the answer streams in, with the calculator call and its result
                assert read_until(master, b"nanochat: [calculator: 12*7] = 84", output)
        assert proc.wait(timeout=60) == 0


def test_cli_ctrl_c_stops_an_answer_and_the_chat_goes_on(chat_base_dir):
    # the base model of chat_base_dir writes words until max_tokens: a long answer, stopped by Ctrl-C
    with in_terminal(["-i", "base", "-m", "4000", "-t", "1", "--decode-mode", "eager", *CLI_ARGS[2:]],
                     chat_base_dir) as (proc, master):
        output = bytearray()
        assert read_until(master, b"You: ", output)
        os.write(master, b"tell me everything\n")
        assert read_until(master, b"nanochat: ", output)
        del output[:]
        assert read_until(master, lambda text: len(text.split()) >= 5, output)  # a few words into the answer
        os.write(master, b"\x03")  # Ctrl-C
        assert read_until(master, b" [stopped]", output) and read_until(master, b"You: ", output)
        os.write(master, b"\x04")  # Ctrl-D leaves
        assert read_until(master, b"Bye.", output)
        assert proc.wait(timeout=60) == 0
