"""
Shared test fixtures. Tests never touch the network or the shared corpus: they generate their data and,
for download code, serve it from a local HTTP server on 127.0.0.1.
"""

import contextlib
import os
import random
import re
import threading
import multiprocessing as mp
import http.server

import pytest
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from nanochat.checkpoint_manager import save_checkpoint
from nanochat.gpt import GPTConfig, build_gpt, norm
from nanochat.tokenizer import RustBPETokenizer


def write_text_parquet(path, texts, row_group_size):
    """A parquet file with one `text` column, `row_group_size` rows per row group (like the real shards)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    pq.write_table(pa.table({"text": list(texts)}), path, row_group_size=row_group_size)


@contextlib.contextmanager
def environment(**variables):
    """Set environment variables for a block (a module-scoped fixture's lifetime), then restore them."""
    saved = {k: os.environ.get(k) for k in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def make_documents(rng, count):
    """`count` documents of 3-12 short generated sentences (random.Random rng)."""
    subjects = ["the cat", "a dog", "the old man", "my sister", "the river", "a small bird", "the teacher"]
    verbs = ["sees", "likes", "follows", "finds", "watches", "carries", "remembers"]
    objects = ["the ball", "a red house", "the moon", "some bread", "the green hill", "a letter", "the garden"]
    return [" ".join(f"{rng.choice(subjects).capitalize()} {rng.choice(verbs)} {rng.choice(objects)}."
                     for _ in range(rng.randint(3, 12))) for _ in range(count)]


def make_pretraining_base_dir(base, vocab_size):
    """
    Pretraining data in NANOCHAT_BASE_DIR `base`: generated documents in shards 0-2 (training) and 3
    (validation; set NANOCHAT_DATA_MAX_SHARD=3), 64 each in row groups of 8, and a tokenizer.
    """
    rng = random.Random(0)
    for shard in range(4):
        write_text_parquet(os.path.join(base, "base_data", f"shard_{shard:05d}.parquet"), make_documents(rng, 64), 8)
    tokenizer = RustBPETokenizer.train_from_iterator(iter(make_documents(rng, 200)), vocab_size)
    tokenizer.save(os.path.join(base, "tokenizer"))


@pytest.fixture
def base_dir(tmp_path, monkeypatch):
    """A fresh NANOCHAT_BASE_DIR for one test."""
    path = tmp_path / "base"
    path.mkdir()
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(path))
    return path


class FileServer:
    """
    Serves the files of `root` at http://127.0.0.1:PORT/NAME (missing files give 404).
    faults[NAME] is a list of misbehaviours used up one per request, then the file is served normally:
      "500"       HTTP 500
      "truncate"  announce the full Content-Length, send half the bytes, close the connection
      "short"     send only the first half, with a Content-Length that matches it (a damaged file
                  that looks complete: only content checks catch it)
    requests lists the names requested, in order.
    """

    def __init__(self, root):
        self.root = str(root)
        self.faults = {}
        self.requests = []
        self.lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                name = self.path.lstrip("/")
                with server.lock:
                    server.requests.append(name)
                    pending = server.faults.get(name)
                    fault = pending.pop(0) if pending else None
                path = os.path.join(server.root, name)
                if fault == "500":
                    self.send_error(500, "injected failure")
                    return
                if not os.path.isfile(path):
                    self.send_error(404, "no such file")
                    return
                with open(path, "rb") as f:
                    body = f.read()
                half = body[: len(body) // 2]
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(half) if fault == "short" else len(body)))
                self.end_headers()
                self.wfile.write(half if fault in ("truncate", "short") else body)
                self.close_connection = True

            def log_message(self, *args):
                pass  # keep test output clean

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def file_server(tmp_path):
    """A FileServer over tmp_path/'served' (put files there; set .faults to inject errors)."""
    root = tmp_path / "served"
    root.mkdir()
    server = FileServer(root)
    yield server
    server.close()


@pytest.fixture
def another_machine(monkeypatch):
    """
    switch() makes every start-up choice of a training script that follows in this process come out the other
    way, as on another machine or in a borderline measurement: nanochat.hardware's bf16 matmul speedup reads the
    opposite (autocast and Newton-Schulz dtype flip), its peak FLOP/s a tiny value (auto would compile), and torch
    runs on another thread count. A resumed run must still make the choices it saved. Threads are put back after.
    """
    from nanochat import hardware
    threads = torch.get_num_threads()

    def switch():
        bf16_fast = hardware.bf16_matmul_speedup("cpu") >= hardware.MIN_BF16_SPEEDUP
        monkeypatch.setattr(hardware, "bf16_matmul_speedup", lambda device: 0.0 if bf16_fast else 10.0)
        monkeypatch.setattr(hardware, "peak_flops", lambda device, dtype=torch.bfloat16: 1e6)
        torch.set_num_threads(1 if threads > 1 else 2)

    yield switch
    torch.set_num_threads(threads)


@pytest.fixture
def run_two_ranks(tmp_path):
    """run(worker) starts worker(rank, world_size, init_file, queue) in 2 spawned processes (gloo rendezvous
    through init_file) and returns {rank: value}, from each worker's queue.put((rank, value))."""
    def run(worker):
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        procs = [ctx.Process(target=worker, args=(rank, 2, str(tmp_path / "init"), queue)) for rank in range(2)]
        for p in procs:
            p.start()
        results = dict(queue.get(timeout=120) for _ in procs)
        for p in procs:
            p.join(timeout=60)
            assert p.exitcode == 0
        return results
    return run


# -----------------------------------------------------------------------------
# A base dir with a tokenizer and two tiny chat models, for the chat CLI and web server tests

CHAT_WORDS = ("the a of and to in is was for on that with as it by at from his her they this be are have had not "
              "one two three time year people way day man world life hand part child eye woman place work week "
              "case point number group problem fact small large long little good new first last great old "
              "river house music light water story garden city morning answer question model train learn").split()
CALCULATOR_EXPRESSION = "12*7"  # the sft model's every answer: this calculator call, then the end of its turn


def _set_next_token(model, current, target, strength=8.0):
    """Make the bigram model (see make_chat_base_dir) give `target` a logit of ~strength after `current`."""
    with torch.no_grad():
        h = norm(model.transformer.wte.weight[current])  # what lm_head sees at that token
        model.lm_head.weight[target] += strength * h / h.dot(h)


def make_chat_base_dir(root):
    """
    NANOCHAT_BASE_DIR with a tokenizer (vocab 512, trained on word salad) and two 1-layer models whose
    blocks are identity at init (zero output projections), so logits depend on the current token only:
    - base_checkpoints/d1: small random logits for whole words and [.,], far lower ones for every other token
      (the special ones too), so sampling with top-k <= 50 writes a word salad that ends only at max_tokens;
    - chatsft_checkpoints/d1: additionally, after <|assistant_start|> it writes the calculator call
      <|python_start|>12*7<|python_end|> greedily and, after the tool's <|output_end|>, <|assistant_end|>.
    """
    rng = random.Random(0)
    texts = [" ".join(rng.choice(CHAT_WORDS) for _ in range(80)) + "." for _ in range(300)]
    tokenizer = RustBPETokenizer.train_from_iterator(iter(texts + ["12*7=84 3+4=7"] * 5), 512)
    tokenizer.save(os.path.join(root, "tokenizer"))
    config = dict(sequence_len=4096, vocab_size=512, n_layer=1, n_head=1, n_kv_head=1, n_embd=64)
    special = tokenizer.encode_special
    for folder, scripted in [("base_checkpoints", False), ("chatsft_checkpoints", True)]:
        torch.manual_seed(0)
        model = build_gpt(GPTConfig(**config))
        with torch.no_grad():
            model.lm_head.weight.normal_(0.0, 0.02)
        if scripted:
            chain = [special("<|assistant_start|>"), special("<|python_start|>"),
                     *tokenizer.encode(CALCULATOR_EXPRESSION), special("<|python_end|>")]
            assert len(set(chain)) == len(chain), "a bigram model needs distinct tokens along its chain"
            for current, target in zip(chain, chain[1:]):
                _set_next_token(model, current, target)
            _set_next_token(model, special("<|output_end|>"), special("<|assistant_end|>"))
        else:
            words = [t for t in range(tokenizer.get_vocab_size())
                     if re.fullmatch(rb" [a-z]+|[.,]", tokenizer.decode_bytes([t]))]
            assert len(words) >= 50, "top-k 50 must only ever see words"
            with torch.no_grad():  # every token's h gets a large shared component that the other tokens' rows oppose
                model.transformer.wte.weight[:, 0] += 4.0
                others = sorted(set(range(tokenizer.get_vocab_size())) - set(words))
                model.lm_head.weight[others] = 0.0
                model.lm_head.weight[others, 0] = -5.0  # logit about -12 after the soft cap; words are about 0 +- 0.5
        meta = {"step": 1, "model_config": config}
        save_checkpoint(os.path.join(root, folder, "d1"), 1, model.state_dict(), None, meta)
    return root


@pytest.fixture(scope="session")
def chat_base_dir(tmp_path_factory):
    """A NANOCHAT_BASE_DIR for the chat tests (see make_chat_base_dir); pass it to the scripts' environment."""
    return str(make_chat_base_dir(str(tmp_path_factory.mktemp("chat_base"))))
