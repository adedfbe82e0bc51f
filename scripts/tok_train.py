"""
Train the BPE tokenizer on the training split and save it to <base>/tokenizer/.

    python -m scripts.tok_train [--max_chars=10_000_000_000] [--doc_cap=10_000] [--vocab_size=65536]

Writes tokenizer.pkl (pickled tiktoken.Encoding) and token_bytes.pt (bytes per token id) and logs a
"Tokenizer training" section to the report. The same text and settings give the same merges and ids
as the reference nanochat's tok_train.
"""

import os
import re
import sys
import time
import logging
import argparse

from nanochat.common import print0, format_seconds
from nanochat.dataset import parquets_iter_batched
from nanochat.tokenizer import RustBPETokenizer, SPECIAL_TOKENS, get_tokenizer_dir
from nanochat.report import get_report

PROGRESS_EVERY_S = 5.0  # seconds between progress lines while reading text


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Train a GPT-4 style BPE tokenizer on the training shards.")
    parser.add_argument("--max_chars", type=int, default=10_000_000_000,
                        help="stop reading text once this many characters were used (default: 10_000_000_000)")
    parser.add_argument("--doc_cap", type=int, default=10_000,
                        help="crop every document to its first doc_cap characters (default: 10_000)")
    parser.add_argument("--vocab_size", type=int, default=65536,
                        help=f"tokens in the vocabulary, including the {len(SPECIAL_TOKENS)} special tokens "
                             "(default: 65536)")
    args = parser.parse_args(argv)
    if args.max_chars < 1 or args.doc_cap < 1:
        parser.error("--max_chars and --doc_cap must be positive")
    min_vocab = 256 + len(SPECIAL_TOKENS)
    if args.vocab_size < min_vocab:
        parser.error(f"--vocab_size must be at least {min_vocab} (256 bytes + {len(SPECIAL_TOKENS)} special tokens)")
    return args


class TrainingText:
    """
    The documents of the training split, each cropped to doc_cap characters. Stops right after the
    document that takes the running total past max_chars (the reference's rule, so both read the same
    text). Counts what it hands out and prints progress.
    """

    def __init__(self, max_chars, doc_cap):
        self.max_chars = max_chars
        self.doc_cap = doc_cap
        self.num_chars = 0
        self.num_docs = 0
        self.start = None

    def __iter__(self):
        self.start = last_print = time.time()
        for batch in parquets_iter_batched(split="train"):
            for doc in batch:
                doc = doc[:self.doc_cap]
                self.num_chars += len(doc)
                self.num_docs += 1
                yield doc
                if self.num_chars > self.max_chars:
                    return
            if time.time() - last_print >= PROGRESS_EVERY_S:
                last_print = time.time()
                self.print_progress()

    def print_progress(self):
        elapsed = time.time() - self.start
        rate = self.num_chars / max(elapsed, 1e-9)
        eta = format_seconds((self.max_chars - self.num_chars) / rate) if rate > 0 else "?"
        print0(f"  read {self.num_chars / 1e6:,.1f}M chars ({100 * self.num_chars / self.max_chars:.1f}% of max_chars) "
               f"in {self.num_docs:,} docs | {rate / 1e6:.2f}M chars/s | {format_seconds(elapsed)} "
               f"| ETA at most {eta}", flush=True)


class EveryTenPercent(logging.Filter):
    """rustbpe logs merge progress every 1%; show every 10% plus its other messages."""

    def filter(self, record):
        match = re.search(r"Progress: \D*(\d+)%", record.getMessage())
        return match is None or int(match.group(1)) % 10 == 0


def show_rustbpe_progress():
    # rustbpe forwards its Rust log lines to the Python logger "rustbpe"
    logger = logging.getLogger("rustbpe")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    if not any(getattr(h, "nanochat_progress", False) for h in logger.handlers):  # once per process
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("  rustbpe: %(message)s"))
        handler.addFilter(EveryTenPercent())
        handler.nanochat_progress = True
        logger.addHandler(handler)


def main(argv=None):
    args = parse_args(argv)
    print0(f"max_chars: {args.max_chars:,} | doc_cap: {args.doc_cap:,} | vocab_size: {args.vocab_size:,} "
           f"({args.vocab_size - len(SPECIAL_TOKENS) - 256:,} merges + 256 bytes + {len(SPECIAL_TOKENS)} special)")
    show_rustbpe_progress()

    text = TrainingText(args.max_chars, args.doc_cap)
    t0 = time.time()
    try:
        tokenizer = RustBPETokenizer.train_from_iterator(iter(text), args.vocab_size)
    except (FileNotFoundError, ValueError) as e:  # no shards on disk, or too little text for vocab_size
        print(f"ERROR: {e}", file=sys.stderr)
        return 1
    train_time = time.time() - t0
    print0(f"Used {text.num_chars:,} chars from {text.num_docs:,} documents")
    print0(f"Training time: {train_time:.2f}s (reading, splitting and counting, then merging)")

    # Round trip on mixed text before saving anything
    probe = "Hello world! Numbers: 7, 42, 2025, 3.14159\nContractions: we're, it's\tTabs, émoji 🎉 and 漢字"
    if tokenizer.decode(tokenizer.encode(probe)) != probe:
        raise RuntimeError("the trained tokenizer does not round-trip text; nothing was saved")

    tokenizer_dir = get_tokenizer_dir()
    pkl_path = tokenizer.save(tokenizer_dir)
    print0(f"Saved {pkl_path} and {os.path.join(tokenizer_dir, 'token_bytes.pt')}")

    lengths = [n for n in tokenizer.token_byte_lengths() if n > 0]  # special tokens count 0 bytes
    mean = sum(lengths) / len(lengths)
    std = (sum((n - mean) ** 2 for n in lengths) / (len(lengths) - 1)) ** 0.5
    bos = tokenizer.get_bos_token_id()
    print0(f"Vocab size {tokenizer.get_vocab_size():,}; special tokens {bos}..{bos + len(SPECIAL_TOKENS) - 1}; "
           f"bytes per token min {min(lengths)} / mean {mean:.2f} / max {max(lengths)}")

    get_report().log(section="Tokenizer training", data=[
        vars(args),
        {"train_time": train_time, "chars_used": text.num_chars, "documents_used": text.num_docs},
        {"num_special_tokens": len(SPECIAL_TOKENS)},
        {"token_bytes_min": min(lengths), "token_bytes_max": max(lengths),
         "token_bytes_mean": mean, "token_bytes_std": std},
    ])
    return 0


if __name__ == "__main__":
    sys.exit(main())
