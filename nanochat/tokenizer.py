"""
GPT-4 style byte-level BPE tokenizer: merges are learned with rustbpe, text is encoded with tiktoken.

On disk a tokenizer is a folder holding
  tokenizer.pkl    a pickled tiktoken.Encoding (the same file the reference nanochat writes and reads)
  token_bytes.pt   int32 tensor (vocab_size,): how many UTF-8 bytes each token id stands for, 0 for
                   special tokens; used to turn a loss into bits per byte, independent of vocab size.
  manifest.json    size and CRC-32 of the two files above, checked when they are loaded (a folder
                   without it, e.g. from the reference, loads unchecked)
"""

import json
import os
import pickle

import tiktoken

from nanochat.common import get_base_dir, atomic_write
from nanochat.integrity import MANIFEST, DamagedFileError, verify_in_manifest, write_recorded

# Appended after the merges, in this order, so <|bos|> gets id vocab_size - 9.
SPECIAL_TOKENS = [
    "<|bos|>",              # starts every document; also the document delimiter in pretraining
    "<|user_start|>",       # the rest only appear in rendered chat conversations
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|python_start|>",     # assistant calls the python tool
    "<|python_end|>",
    "<|output_start|>",     # tool output handed back to the assistant
    "<|output_end|>",
]

# GPT-4's (cl100k) split pattern, except digits group in runs of at most 2 (\p{N}{1,2} instead of
# \p{N}{1,3}) so a small vocabulary spends fewer tokens on numbers. Must match the reference exactly.
SPLIT_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
                 r"""|\s*[\r\n]|\s+(?!\S)|\s+""")

# Name stored inside the pickled Encoding; the reference uses the same one, so the files match byte for byte.
ENCODING_NAME = "rustbpe"

# Assistant content parts: (opening token, closing token, mask). python_output is written by the tool at
# inference time, not by the model, so it is never a training target.
PART_TOKENS = {
    "text": (None, None, 1),
    "python": ("<|python_start|>", "<|python_end|>", 1),
    "python_output": ("<|output_start|>", "<|output_end|>", 0),
}

TOKENIZER_FILE = "tokenizer.pkl"
TOKEN_BYTES_FILE = "token_bytes.pt"
# what rebuilds a damaged tokenizer file
REBUILD_HINT = ("Rebuild the tokenizer with the command that made it (`python -m scripts.tok_train` with the same "
                "--max_chars and --vocab_size gives the same tokenizer on the same data), "
                "or restore the folder from a copy.")


class RustBPETokenizer:
    """A tiktoken.Encoding plus the nanochat conveniences (special tokens, prepend/append, save/load)."""

    def __init__(self, enc, bos_token="<|bos|>"):
        self.enc = enc
        self.special_ids = {name: enc.encode_single_token(name) for name in enc.special_tokens_set}
        self.bos_token_id = self.encode_special(bos_token)

    # ---- construction ----

    @classmethod
    def train_from_iterator(cls, text_iterator, vocab_size):
        """Learn vocab_size - len(SPECIAL_TOKENS) byte-level merges from an iterator of strings."""
        import rustbpe  # only training needs it; loading a trained tokenizer does not
        num_ranks = vocab_size - len(SPECIAL_TOKENS)
        if num_ranks < 256:
            raise ValueError(f"vocab_size={vocab_size} leaves {num_ranks} ids for bytes+merges after the "
                             f"{len(SPECIAL_TOKENS)} special tokens; it must be at least {256 + len(SPECIAL_TOKENS)}")
        trainer = rustbpe.Tokenizer()
        trainer.train_from_iterator(text_iterator, num_ranks, pattern=SPLIT_PATTERN)
        # rustbpe returns (token bytes, rank) pairs: 256 single bytes, then one per merge in merge order
        mergeable_ranks = {bytes(token): rank for token, rank in trainer.get_mergeable_ranks()}
        if len(mergeable_ranks) != num_ranks:
            # rustbpe stops early once no adjacent pair is left to merge: the text is too small
            raise ValueError(f"training text only supported {len(mergeable_ranks) - 256} merges but "
                             f"vocab_size={vocab_size} needs {num_ranks - 256}: train on more text or lower vocab_size")
        if sorted(mergeable_ranks.values()) != list(range(num_ranks)):
            # two merges spelling the same bytes would make ids collide in tiktoken; fail loudly instead
            raise RuntimeError("rustbpe produced two merges with identical bytes; the encoding would be inconsistent")
        special_tokens = {name: num_ranks + i for i, name in enumerate(SPECIAL_TOKENS)}
        enc = tiktoken.Encoding(
            name=ENCODING_NAME,
            pat_str=trainer.get_pattern(),
            mergeable_ranks=mergeable_ranks,  # token bytes -> rank (= token id); lower rank merges first
            special_tokens=special_tokens,
        )
        return cls(enc, "<|bos|>")

    @classmethod
    def from_directory(cls, tokenizer_dir):
        path = os.path.join(tokenizer_dir, TOKENIZER_FILE)
        if not os.path.exists(path):
            raise FileNotFoundError(f"no tokenizer at {path}: train one with `python -m scripts.tok_train`")
        verify_in_manifest(path, REBUILD_HINT, manifest_fix=REBUILD_HINT)
        try:
            with open(path, "rb") as f:
                enc = pickle.load(f)
        except ImportError:
            raise  # a missing package is not a damaged file
        except Exception as e:  # unpickling damaged bytes can fail in many ways: all of them mean the same here
            raise DamagedFileError(path, f"it cannot be unpickled ({type(e).__name__}: {e})", REBUILD_HINT) from None
        if not isinstance(enc, tiktoken.Encoding):
            raise DamagedFileError(path, f"it holds a {type(enc).__name__}, not a tiktoken.Encoding", REBUILD_HINT)
        return cls(enc, "<|bos|>")

    @classmethod
    def from_pretrained(cls, tiktoken_name):
        """An OpenAI encoding such as "gpt2" or "cl100k_base" (downloaded by tiktoken, needs network once)."""
        enc = tiktoken.get_encoding(tiktoken_name)
        # OpenAI's document delimiter is called <|endoftext|>; it plays the role of our <|bos|>
        return cls(enc, "<|endoftext|>")

    # ---- vocabulary ----

    def get_vocab_size(self):
        return self.enc.n_vocab

    def get_special_tokens(self):
        """Special token names, in id order."""
        return sorted(self.special_ids, key=self.special_ids.get)

    def id_to_token(self, token_id):
        return self.enc.decode([token_id])

    def encode_special(self, name):
        if name not in self.special_ids:
            raise KeyError(f"{name!r} is not a special token of this tokenizer; known: {self.get_special_tokens()}")
        return self.special_ids[name]

    def get_bos_token_id(self):
        return self.bos_token_id

    def token_byte_lengths(self):
        """List with the UTF-8 byte count of every id; 0 for special tokens and unused ids."""
        special = set(self.special_ids.values())
        lengths = []
        for token_id in range(self.get_vocab_size()):
            if token_id in special:
                lengths.append(0)
                continue
            try:
                lengths.append(len(self.enc.decode_single_token_bytes(token_id)))
            except KeyError:  # a gap in the id space (cl100k_base has some below its last special token)
                lengths.append(0)
        return lengths

    # ---- encoding ----

    def encode(self, text, prepend=None, append=None, num_threads=8):
        """
        str -> list[int]; list[str] -> list[list[int]] (encoded in parallel by tiktoken).
        Special-token text inside `text` is encoded as ordinary text, never as a special id.
        prepend/append: a special token name or an id, added to every sequence.
        """
        prefix = [] if prepend is None else [self._as_id(prepend)]
        suffix = [] if append is None else [self._as_id(append)]
        if isinstance(text, str):
            return prefix + self.enc.encode_ordinary(text) + suffix
        if isinstance(text, (list, tuple)):
            rows = self.enc.encode_ordinary_batch(list(text), num_threads=num_threads)
            if prefix or suffix:
                rows = [prefix + row + suffix for row in rows]
            return rows
        raise TypeError(f"encode takes a str or a list of str, got {type(text).__name__}")

    __call__ = encode

    def _as_id(self, token):
        return self.encode_special(token) if isinstance(token, str) else int(token)

    def decode(self, ids):
        return self.enc.decode(ids)

    def decode_bytes(self, ids):
        """The raw bytes of ids: a multi-byte character split over tokens is not yet a str (see chat.TextStream)."""
        return self.enc.decode_bytes(ids)

    # ---- conversations ----

    def render_conversation(self, conversation, max_tokens=2048):
        """
        One chat conversation -> (ids, mask), two lists of the same length, cut to max_tokens.
        mask is 1 on the tokens the model learns to write (the assistant's text, its python calls and its
        <|assistant_end|>) and 0 on what it is given (bos, user turns, <|assistant_start|>, tool output).
        """
        special = self.encode_special
        ids, mask = [self.get_bos_token_id()], [0]

        def add(token_ids, supervised):
            ids.extend(token_ids)
            mask.extend([supervised] * len(token_ids))

        for message in chat_messages(conversation):
            content = message["content"]
            if message["role"] == "user":
                add([special("<|user_start|>"), *self.encode(content), special("<|user_end|>")], 0)
                continue
            add([special("<|assistant_start|>")], 0)
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
            for part in parts:
                start, end, supervised = PART_TOKENS[part["type"]]
                wrapped = (([special(start)] if start else []) + self.encode(part["text"])
                           + ([special(end)] if end else []))
                add(wrapped, supervised)
            add([special("<|assistant_end|>")], 1)
        # the cut keeps memory bounded for a few very long conversations (the reference does the same)
        return ids[:max_tokens], mask[:max_tokens]

    def render_for_completion(self, conversation):
        """
        The prompt for the assistant's next turn: the conversation without its last assistant message (if it
        ends with one), then <|assistant_start|>. Not truncated, unlike render_conversation: cutting the end
        would drop the very question being asked, so callers with a context limit decide what to drop.
        """
        messages = conversation.get("messages") if isinstance(conversation, dict) else None
        if (isinstance(messages, list) and messages and isinstance(messages[-1], dict)
                and messages[-1].get("role") == "assistant"):
            conversation = {**conversation, "messages": messages[:-1]}
        ids, _ = self.render_conversation(conversation, max_tokens=None)
        return ids + [self.encode_special("<|assistant_start|>")]

    def visualize_tokenization(self, ids, mask):
        """Debug view of a rendered conversation: supervised tokens green, the rest red, '|' between tokens."""
        green, red, reset = "\033[92m", "\033[91m", "\033[0m"
        return "|".join(f"{green if m else red}{self.decode([i])}{reset}" for i, m in zip(ids, mask))

    # ---- saving ----

    def save(self, tokenizer_dir):
        """Write tokenizer.pkl, token_bytes.pt and, last, their manifest into tokenizer_dir, each atomically."""
        import torch
        os.makedirs(tokenizer_dir, exist_ok=True)
        pkl_path = os.path.join(tokenizer_dir, TOKENIZER_FILE)
        records = {TOKENIZER_FILE: write_recorded(pkl_path, lambda f: pickle.dump(self.enc, f))}
        token_bytes = torch.tensor(self.token_byte_lengths(), dtype=torch.int32)
        records[TOKEN_BYTES_FILE] = write_recorded(os.path.join(tokenizer_dir, TOKEN_BYTES_FILE),
                                                   lambda f: torch.save(token_bytes, f))
        atomic_write(os.path.join(tokenizer_dir, MANIFEST), lambda f: json.dump(records, f, indent=2), mode="w")
        return pkl_path


def chat_messages(conversation):
    """
    The messages of {"messages": [...]} checked and ready to render: a leading system message is merged into
    the first user message (the tokenizer has no system role), then turns go user, assistant, user, ...
    Raises ValueError naming the first bad message (its index in the original list). Does not mutate input.
    """
    if not isinstance(conversation, dict) or not isinstance(conversation.get("messages"), list):
        raise ValueError(f'a conversation is a dict {{"messages": [...]}}, got {type(conversation).__name__}')
    messages = conversation["messages"]
    if not messages:
        raise ValueError("conversation has no messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"message {i} must be a dict with 'role' and 'content', got {message!r:.200}")
    offset = 0  # how many original messages precede messages[0] after the merge
    if messages[0]["role"] == "system":
        if len(messages) < 2 or messages[1]["role"] != "user":
            raise ValueError("message 0 is a system message, so message 1 must be from the user")
        if not isinstance(messages[0]["content"], str):
            raise ValueError("message 0 (system) content must be a string")
        if not isinstance(messages[1]["content"], str):
            raise ValueError("message 1 (user) content must be a string")
        merged = {"role": "user", "content": messages[0]["content"] + "\n\n" + messages[1]["content"]}
        messages, offset = [merged] + list(messages[2:]), 1
    for i, message in enumerate(messages):
        where = f"message {i + offset}"
        expected = "user" if i % 2 == 0 else "assistant"
        role, content = message["role"], message["content"]
        if role != expected:
            raise ValueError(f"{where} is from {role!r} but should be from {expected!r} "
                             "(turns alternate user, assistant, ...)")
        if role == "user" and not isinstance(content, str):
            raise ValueError(f"{where} (user) content must be a string, got {type(content).__name__}")
        if role == "assistant" and not isinstance(content, (str, list)):
            raise ValueError(f"{where} (assistant) content must be a string or a list of parts, "
                             f"got {type(content).__name__}")
        if role == "assistant" and isinstance(content, list):
            for j, part in enumerate(content):
                if (not isinstance(part, dict) or part.get("type") not in PART_TOKENS
                        or not isinstance(part.get("text"), str)):
                    raise ValueError(f"{where} (assistant) part {j} must be {{'type': one of {list(PART_TOKENS)}, "
                                     f"'text': str}}, got {part!r:.200}")
    return messages


def get_tokenizer_dir():
    return os.path.join(get_base_dir(), "tokenizer")


def get_tokenizer():
    return RustBPETokenizer.from_directory(get_tokenizer_dir())


def get_token_bytes(device="cpu"):
    """int32 tensor (vocab_size,) of bytes per token id, 0 for special tokens."""
    import torch
    path = os.path.join(get_tokenizer_dir(), TOKEN_BYTES_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no token byte counts at {path}: train a tokenizer with `python -m scripts.tok_train`")
    verify_in_manifest(path, REBUILD_HINT, manifest_fix=REBUILD_HINT)
    try:
        token_bytes = torch.load(path, map_location=device, weights_only=True)
    except (RuntimeError, EOFError, ValueError) as e:
        if "weights_only" in str(e):
            raise  # not damage: an unexpected kind of object in the file
        raise DamagedFileError(path, f"torch cannot read it ({str(e).splitlines()[0]})", REBUILD_HINT) from None
    if not (isinstance(token_bytes, torch.Tensor) and token_bytes.ndim == 1 and token_bytes.dtype == torch.int32):
        raise DamagedFileError(path, "it does not hold a 1-D int32 tensor", REBUILD_HINT)
    return token_bytes
