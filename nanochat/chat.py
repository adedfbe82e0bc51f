"""
Talking to a trained model: what the chat CLI and the web server share.

A turn: the conversation so far is rendered into a prompt (tokenizer.render_for_completion), the
Engine streams the answer one token at a time, and TextStream turns those tokens into text as they
come. A tool call shows up in the answer text between its special-token names, e.g.

    The answer is <|python_start|>12*7<|python_end|><|output_start|>84<|output_end|>.

and assistant_content() turns such text back into the parts render_conversation expects, so an
answer sent back with the next question is rendered with the same special tokens it was written with.
"""

import codecs
import re
import sys

import torch

from nanochat import hardware
from nanochat.checkpoint_manager import load_model
from nanochat.decode import choose_decode_dtype
from nanochat.engine import Engine, answer_enders

TOOL_TOKENS = ["<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>"]
_TOOL_SPLIT = re.compile("(" + "|".join(re.escape(name) for name in TOOL_TOKENS) + ")")


class TextStream:
    """
    Token ids in, text out, as they are generated. A character whose UTF-8 bytes are split over
    several tokens is held back until its last byte arrives, so no piece ends in a broken character;
    the pieces and finish() joined equal tokenizer.decode of all the ids (tool tokens give their names).
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.tool_names = {tokenizer.encode_special(name): name for name in TOOL_TOKENS}
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")  # same errors as decode()

    def add(self, token):
        """The text that token completes: '' while a character is still incomplete."""
        if token in self.tool_names:
            return self.finish() + self.tool_names[token]
        return self.utf8.decode(self.tokenizer.decode_bytes([token]))

    def finish(self):
        """What is left: bytes of a character that never completed, as U+FFFD (what decode() gives too)."""
        text = self.utf8.decode(b"", final=True)
        self.utf8.reset()
        return text


def assistant_content(text):
    """
    An answer's text as streamed -> a message content for render_conversation: the string itself when it
    holds no tool call, else a list of {"type": "text" | "python" | "python_output", "text": ...} parts.
    A call cut short (the answer hit its token limit) keeps what was written of it.
    """
    pieces = _TOOL_SPLIT.split(text)
    if len(pieces) == 1:
        return text
    start_types = {"<|python_start|>": "python", "<|output_start|>": "python_output"}
    parts, current = [], "text"
    for i, piece in enumerate(pieces):
        if i % 2 == 1:  # a marker: a start opens its part, an end goes back to plain text
            current = start_types.get(piece, "text")
        elif piece:
            parts.append({"type": current, "text": piece})
    return parts


class ChatModel:
    """A model loaded for chatting: its Engine, tokenizer, device and the dtype it decodes in."""

    def __init__(self, source, device, model_tag=None, step=None, dtype="auto", decode_mode=None,
                 samplings=((0.6, 50),)):
        model, tokenizer, meta = load_model(source, device, phase="eval", model_tag=model_tag, step=step)
        if dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"dtype must be auto, float32 or bfloat16, got {dtype!r}")
        decode_dtype = choose_decode_dtype(device, decode_mode) if dtype == "auto" else getattr(torch, dtype)
        self.engine = Engine(model, tokenizer, dtype=decode_dtype, decode_mode=decode_mode or None)
        self.tokenizer = tokenizer
        self.meta = meta
        self.device = torch.device(device)
        self.dtype = str(decode_dtype).removeprefix("torch.")
        self.context_len = model.config.sequence_len  # the length the model was trained on
        if self.device.type == "cpu" and hardware.omp_threads_sleep():
            print("OMP_WAIT_POLICY=PASSIVE: every decode step waits for sleeping threads to wake (compiled decoding "
                  "~5x slower on a quiet CPU); unset it to chat faster", file=sys.stderr)
        if decode_mode == "compile":  # compile now, while loading, rather than in the middle of the first answer,
            # the steps that the answers' (temperature, top_k) samplings use: one serves every top-k draw, another
            # greedy ones, a third whole-vocabulary ones (decode.Decoder.start)
            for temperature, top_k in samplings:
                for _ in self.engine.generate([tokenizer.get_bos_token_id()], max_tokens=2, temperature=temperature,
                                              top_k=top_k):
                    pass

    def describe(self):
        config = self.engine.model.config
        return (f"{config.n_layer} layers, width {config.n_embd}, context {config.sequence_len}, "
                f"step {self.meta.get('step')}, {self.dtype} on {self.device}")

    def answer(self, prompt, max_tokens, temperature=0.6, top_k=50, seed=42):
        """
        Stream the answer to a rendered prompt: one text piece per generated token ('' while a character
        is incomplete), until the model ends its turn, max_tokens, or the context length it was trained on.
        A character cut off by the limit is dropped. Raises ValueError if the prompt leaves no room.
        The generator returns why the answer ended (StopIteration.value): "stop" when the model ended its
        turn, "length" when it ran into max_tokens or the context (OpenAI's finish_reason values).
        """
        room = self.context_len - len(prompt)
        if room <= 0:
            raise ValueError(f"the conversation is {len(prompt)} tokens but the model's context is "
                             f"{self.context_len}: start a new conversation")
        stream = TextStream(self.tokenizer)
        enders = answer_enders(self.tokenizer)
        for token_column, _ in self.engine.generate(prompt, num_samples=1, max_tokens=min(max_tokens, room),
                                                    temperature=temperature, top_k=top_k, seed=seed):
            token = token_column[0]  # one sample
            if token in enders:
                return "stop"
            yield stream.add(token)
        return "length"
