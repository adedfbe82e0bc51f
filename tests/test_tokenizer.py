"""
Tokenizer: merges against a textbook BPE, round trips, digit grouping, special tokens, save/load,
batch vs single encoding, determinism, and the tok_train / tok_eval scripts on generated shards.
"""

import pickle
import random
from collections import Counter

import pytest
import regex
import tiktoken
import torch

from nanochat import dataset
from nanochat.tokenizer import (RustBPETokenizer, SPECIAL_TOKENS, SPLIT_PATTERN, get_tokenizer, get_token_bytes,
                                get_tokenizer_dir)
from conftest import write_text_parquet

WORDS = ("the of and a to in is was for on that with as by it from at an be this are or which his her "
         "model token merge byte pair river stone light water number value people year first").split()
EXTRAS = ["café", "naïve", "Straße", "Ελλάδα", "москва", "東京", "日本語", "🙂", "🚀🚀", "👩‍💻", "e\u0301",
          "2024", "3.14159", "1,000,000", "0x1F", "42", "'s", "'re", "I'LL", "\t", "\r\n", "   ", "\n\n", "x=y+1;"]
MIXED_SAMPLES = [
    "",
    "Hello, world!",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\r\nand\u00a0nbsp and \u3000 ideographic space",
    "digits 0 12 345 6789 1234567890 and ٣٤٥ and ½ ²",
    "emoji 🙂🚀 👩‍💻 flags 🇫🇷 and skin tones 👍🏽",
    "unicode: naïve café Straße Ελλάδα москва 東京 日本語 한국어 e\u0301",
    "never seen in training: ☃ ∮ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \x00\x01 \U0010FFFF",
    "<|bos|> looks special but is plain text <|user_start|>",
    "def f(x):\n    return x ** 2  # square\n\n\n",
]


SYLLABLES = "ka ri to ne mu sa lo pe vi an or el ith ung str qu ex".split()


def make_docs(seed, num_docs, words_per_doc=60):
    """English-ish filler, made-up words (so there is always something left to merge) and odd extras."""
    rng = random.Random(seed)

    def word():
        roll = rng.random()
        if roll < 0.15:
            return rng.choice(EXTRAS)
        if roll < 0.45:
            return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 4)))
        return rng.choice(WORDS)

    docs = []
    for _ in range(num_docs):
        parts = [word() for _ in range(words_per_doc)]
        docs.append(" ".join(parts) + rng.choice([".", "!\n", "\n\n", ""]))
    return docs


@pytest.fixture(scope="module")
def docs():
    return make_docs(0, 300)


@pytest.fixture(scope="module")
def tok(docs):
    return RustBPETokenizer.train_from_iterator(iter(docs), vocab_size=512)


def textbook_bpe_ranks(texts, num_merges):
    """
    Plain BPE, recounting everything each step: split with the pattern, count adjacent pairs over all
    chunks, merge the most frequent pair (ties: the smallest (left id, right id)), left to right.
    Returns {token bytes: id}.
    """
    words = Counter(tuple(chunk.encode("utf-8")) for text in texts for chunk in regex.findall(SPLIT_PATTERN, text))
    vocab = {i: bytes([i]) for i in range(256)}
    for step in range(num_merges):
        pairs = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        best = min(pairs, key=lambda p: (-pairs[p], p))
        new_id = 256 + step
        vocab[new_id] = vocab[best[0]] + vocab[best[1]]
        merged = Counter()
        for word, count in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(new_id)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += count
        words = merged
    return {token: i for i, token in vocab.items()}


def ranks_of(tokenizer):
    """{token bytes: id} of the non-special tokens."""
    n = tokenizer.get_vocab_size() - len(SPECIAL_TOKENS)
    return {tokenizer.enc.decode_single_token_bytes(i): i for i in range(n)}


def test_merges_match_textbook_bpe():
    docs = make_docs(1, 60, words_per_doc=40)
    vocab_size = 256 + 120 + len(SPECIAL_TOKENS)
    tokenizer = RustBPETokenizer.train_from_iterator(iter(docs), vocab_size)
    assert ranks_of(tokenizer) == textbook_bpe_ranks(docs, 120)


def test_encoding_matches_textbook_merge_order(tok):
    # tiktoken applies merges by rank; on each chunk that must equal replaying the merges in order
    ranks = ranks_of(tok)
    merges = sorted((rank, token) for token, rank in ranks.items() if rank >= 256)
    for text in MIXED_SAMPLES:
        expected = []
        for chunk in regex.findall(SPLIT_PATTERN, text):
            parts = [bytes([b]) for b in chunk.encode("utf-8")]
            for _, token in merges:
                i = 0
                while i < len(parts) - 1:
                    if parts[i] + parts[i + 1] == token:
                        parts[i:i + 2] = [token]
                    i += 1
            expected += [ranks[p] for p in parts]
        assert tok.encode(text) == expected


def test_round_trip(tok, docs):
    for text in MIXED_SAMPLES + docs[:20]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert all(0 <= i < tok.get_vocab_size() - len(SPECIAL_TOKENS) for i in ids)


def test_digits_group_in_at_most_two():
    # "123456" everywhere: a tokenizer without the \p{N}{1,2} rule would learn "123", "1234", ...
    docs = [f"year {n} code 123456 and 9876543210 then {n * 7} " + " ".join(make_docs(n, 1, 10))
            for n in range(1000, 1400)]
    tokenizer = RustBPETokenizer.train_from_iterator(iter(docs), vocab_size=400)
    longest_digit_run = max(len(m) for t in ranks_of(tokenizer) for m in regex.findall(rb"[0-9]+", t) or [b""])
    assert longest_digit_run == 2
    pieces = [tokenizer.decode([i]) for i in tokenizer.encode("1234567")]
    assert pieces == ["12", "34", "56", "7"]


def test_special_tokens(tok):
    vocab_size = tok.get_vocab_size()
    assert vocab_size == 512
    first = vocab_size - len(SPECIAL_TOKENS)  # specials come right after the merges, in order
    assert [tok.encode_special(name) for name in SPECIAL_TOKENS] == list(range(first, vocab_size))
    assert tok.get_special_tokens() == SPECIAL_TOKENS
    assert tok.get_bos_token_id() == first
    assert tok.id_to_token(first + 3) == "<|assistant_start|>"
    with pytest.raises(KeyError, match="not a special token"):
        tok.encode_special("<|nope|>")

    text = "hello <|bos|> world"
    plain = tok.encode(text)
    assert first not in plain  # special-token text in the input stays ordinary text
    bos, end = tok.get_bos_token_id(), tok.encode_special("<|assistant_end|>")
    assert tok.encode(text, prepend="<|bos|>", append="<|assistant_end|>") == [bos] + plain + [end]
    assert tok(text, prepend=bos, append=end) == [bos] + plain + [end]
    assert tok.encode([text, ""], prepend="<|bos|>") == [[bos] + plain, [bos]]
    assert tok.encode([text], append=end) == [plain + [end]]
    assert tok.decode([bos] + plain) == "<|bos|>" + text
    with pytest.raises(TypeError, match="str or a list"):
        tok.encode(b"bytes")


def test_batch_encoding_equals_single(tok, docs):
    texts = MIXED_SAMPLES + docs
    singles = [tok.encode(t) for t in texts]
    assert tok.encode(texts) == singles
    assert tok.encode(texts, num_threads=1) == singles
    assert tok.encode(texts, num_threads=4, prepend="<|bos|>") == [[tok.get_bos_token_id()] + s for s in singles]


def test_save_load_round_trip(tok, base_dir):
    path = tok.save(get_tokenizer_dir())
    with open(path, "rb") as f:
        enc = pickle.load(f)  # the reference's format: a plain pickled tiktoken.Encoding
    assert isinstance(enc, tiktoken.Encoding)
    assert enc.n_vocab == 512 and enc.special_tokens_set == set(SPECIAL_TOKENS)
    loaded = get_tokenizer()
    assert ranks_of(loaded) == ranks_of(tok)
    assert loaded.get_bos_token_id() == tok.get_bos_token_id()
    for text in MIXED_SAMPLES:
        assert loaded.encode(text) == tok.encode(text)

    token_bytes = get_token_bytes(device="cpu")
    assert token_bytes.dtype == torch.int32 and token_bytes.shape == (512,)
    first_special = 512 - len(SPECIAL_TOKENS)
    assert token_bytes[first_special:].tolist() == [0] * len(SPECIAL_TOKENS)
    assert token_bytes[:256].tolist() == [1] * 256  # every single byte counts as one, UTF-8 or not
    by_rank = sorted(ranks_of(tok).items(), key=lambda x: x[1])
    assert token_bytes[:first_special].tolist() == [len(t) for t, _ in by_rank]
    # summed over an encoding, the byte counts give back the UTF-8 length exactly (what bits per byte needs)
    for text in MIXED_SAMPLES:
        ids = tok.encode(text, prepend="<|bos|>")
        assert int(token_bytes[ids].sum()) == len(text.encode("utf-8"))


def test_missing_files_name_the_training_command(base_dir):
    with pytest.raises(FileNotFoundError, match="scripts.tok_train"):
        get_tokenizer()
    with pytest.raises(FileNotFoundError, match="scripts.tok_train"):
        get_token_bytes()


def test_training_is_deterministic(docs):
    # > 8192 documents so rustbpe ingests several buffers; its counting runs in parallel
    many = make_docs(2, 9000, words_per_doc=8)
    a = RustBPETokenizer.train_from_iterator(iter(many), vocab_size=400)
    b = RustBPETokenizer.train_from_iterator(list(many), vocab_size=400)
    c = RustBPETokenizer.train_from_iterator(reversed(many), vocab_size=400)  # counts do not depend on order
    assert pickle.dumps(a.enc) == pickle.dumps(b.enc) == pickle.dumps(c.enc)


def test_training_errors():
    with pytest.raises(ValueError, match="at least 265"):
        RustBPETokenizer.train_from_iterator(iter(["abc"]), vocab_size=264)
    with pytest.raises(ValueError, match="train on more text or lower vocab_size"):
        RustBPETokenizer.train_from_iterator(iter(["ab ab ab"]), vocab_size=400)


# ---- scripts ----

@pytest.fixture
def shards(base_dir, monkeypatch):
    """Training shards 0, 1 (row groups of 16 docs) and validation shard 2."""
    monkeypatch.setenv("NANOCHAT_DATA_MAX_SHARD", "2")
    texts = {i: make_docs(10 + i, 40 if i < 2 else 16) for i in range(3)}
    for i, shard_texts in texts.items():
        write_text_parquet(base_dir / "base_data" / dataset.shard_filename(i), shard_texts, row_group_size=16)
    return texts


def test_tok_train_script(shards, base_dir):
    from scripts import tok_train
    max_chars, doc_cap = 9000, 250
    # the text it must use: docs cropped to doc_cap, up to and including the one that passes max_chars
    expected, total = [], 0
    for doc in shards[0] + shards[1]:
        expected.append(doc[:doc_cap])
        total += len(expected[-1])
        if total > max_chars:
            break
    assert len(expected) < len(shards[0]) + len(shards[1])  # the cap is really hit mid-stream

    assert tok_train.main([f"--max_chars={max_chars}", f"--doc_cap={doc_cap}", "--vocab_size=400"]) == 0
    direct = RustBPETokenizer.train_from_iterator(iter(expected), vocab_size=400)
    assert pickle.dumps(get_tokenizer().enc) == pickle.dumps(direct.enc)
    assert get_token_bytes().tolist() == direct.token_byte_lengths()
    report = (base_dir / "report" / "tokenizer-training.md").read_text()
    assert "train_time" in report and "token_bytes_mean" in report

    with pytest.raises(SystemExit):
        tok_train.main(["--vocab_size=100"])
    assert tok_train.main(["--vocab_size=60000"]) == 1  # far more merges than this text supports


def test_scripts_without_data_fail_clearly(base_dir, capsys):
    from scripts import tok_train, tok_eval
    assert tok_train.main(["--vocab_size=300"]) == 1
    assert "python -m nanochat.dataset" in capsys.readouterr().err
    assert tok_eval.main(["--no_baselines"]) == 1
    assert "python -m scripts.tok_train" in capsys.readouterr().err


def test_tok_eval_script(shards, base_dir, monkeypatch, capsys):
    from scripts import tok_eval
    RustBPETokenizer.train_from_iterator(iter(shards[0]), vocab_size=400).save(get_tokenizer_dir())

    assert tok_eval.main(["--no_baselines"]) == 0
    report = (base_dir / "report" / "tokenizer-evaluation.md").read_text()
    for name in ("news", "code", "math", "science", "spanish", "japanese", "fwe-train", "fwe-val"):
        assert f"| {name} |" in report
    assert "GPT-2" not in report

    # offline: a baseline that never arrives is given up on after the timeout, with a one-line notice
    monkeypatch.setattr(tok_eval.RustBPETokenizer, "from_pretrained",
                        classmethod(lambda cls, name: __import__("time").sleep(30)))
    assert tok_eval.main(["--baseline_timeout=0.2"]) == 0
    assert "comparison skipped" in capsys.readouterr().out

    # online: stand in our own tokenizer for GPT-2/GPT-4 (same counts, so 0% difference)
    monkeypatch.setattr(tok_eval.RustBPETokenizer, "from_pretrained", classmethod(lambda cls, name: get_tokenizer()))
    assert tok_eval.main([]) == 0
    report = (base_dir / "report" / "tokenizer-evaluation.md").read_text()
    assert "GPT-2 tokens" in report and "GPT-4 B/tok" in report and "+0.0%" in report
