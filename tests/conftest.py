"""
Shared test fixtures. Tests never touch the network or the shared corpus: they generate their data and,
for download code, serve it from a local HTTP server on 127.0.0.1.
"""

import os
import threading
import multiprocessing as mp
import http.server

import pytest
import pyarrow as pa
import pyarrow.parquet as pq


def write_text_parquet(path, texts, row_group_size):
    """A parquet file with one `text` column, `row_group_size` rows per row group (like the real shards)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    pq.write_table(pa.table({"text": list(texts)}), path, row_group_size=row_group_size)


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
