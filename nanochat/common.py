"""
Shared plumbing: where files live, distributed set-up, rank-0 printing, robust downloads.
"""

import faulthandler
import gc
import os
import random
import sys
import time
import tempfile
import http.client
import urllib.request
import urllib.error

import torch
import torch.distributed as dist
from filelock import FileLock

from nanochat import hardware


def get_base_dir():
    """All intermediates (data, tokenizer, checkpoints, reports) live here; NANOCHAT_BASE_DIR overrides."""
    base_dir = os.environ.get("NANOCHAT_BASE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "nanochat")
    os.makedirs(base_dir, exist_ok=True)
    return base_dir


def print0(s="", **kwargs):
    if int(os.environ.get("RANK", 0)) == 0:
        print(s, **kwargs)


def is_ddp():
    return int(os.environ.get("RANK", -1)) != -1


def get_dist_info():
    """(ddp, rank, local_rank, world_size) from the variables torchrun sets."""
    if not is_ddp():
        return False, 0, 0, 1
    missing = [v for v in ("RANK", "LOCAL_RANK", "WORLD_SIZE") if v not in os.environ]
    if missing:
        raise RuntimeError(f"RANK is set but {', '.join(missing)} is not: launch distributed runs with torchrun")
    return True, int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])


def autodetect_device_type():
    if torch.cuda.is_available():
        device_type = "cuda"
    elif torch.backends.mps.is_available():
        device_type = "mps"
    else:
        device_type = "cpu"
    print0(f"Autodetected device type: {device_type}")
    return device_type


def compute_init(device_type="cuda", seed=42):
    """Seeds, precision and (under torchrun) the process group: nccl on CUDA, gloo on CPU/MPS."""
    if device_type not in ("cuda", "mps", "cpu"):
        raise ValueError(f"device_type must be one of cuda, mps, cpu (got {device_type!r})")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device_type is 'cuda' but this PyTorch build sees no CUDA device; use --device_type=cpu")
    if device_type == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError("device_type is 'mps' but MPS is not available; use --device_type=cpu")

    # Global seed: only module init uses the global RNG; data and sampling use explicit generators.
    torch.manual_seed(seed)  # seeds every device
    # Set the thread count explicitly, even to its default: a process's first set_num_threads also turns MKL's
    # dynamic threading off for good, which on MKL's Intel code paths changes the last bits of fp32 matmuls.
    # Doing it at start-up keeps a resumed run's numbers the same as an uninterrupted one's.
    torch.set_num_threads(torch.get_num_threads())
    if device_type == "cuda":
        torch.set_float32_matmul_precision("high")  # tf32 matmuls
    if device_type == "cpu":
        hardware.keep_freed_memory()  # no fresh pages for each step's tensors: a CPU training step ~1.1x faster

    ddp, rank, local_rank, world_size = get_dist_info()
    if ddp:
        # A rank that dies of a signal (a native abort in a communication thread, a segfault) prints every
        # thread's Python stack first: torchrun alone reports only the signal's number.
        faulthandler.enable(all_threads=True)
    if ddp and device_type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl", device_id=device)
        dist.barrier()
    else:
        device = torch.device(device_type)
        if ddp:
            dist.init_process_group(backend="gloo")
            dist.barrier()
    if rank == 0 and ddp:
        print(f"Distributed world size: {world_size} (backend {dist.get_backend()})")
    return ddp, rank, local_rank, world_size, device


def compute_cleanup():
    if is_ddp() and dist.is_initialized():
        dist.destroy_process_group()
        # Free what reference cycles still hold of the process group now, while the interpreter is whole: left
        # to interpreter teardown, a gloo rank could abort ("terminate called without an active exception")
        # after finishing its work.
        gc.collect()


def fail(message, every_rank_agrees=False):
    """
    Stop a script with a message for the user (no traceback): bad settings, missing files. every_rank_agrees:
    an error that follows from the settings alone, found alike on every rank. Under torchrun only rank 0 says
    it then, and the other ranks leave with exit code 0, so that torchrun reports one failure and does not
    stop rank 0 before it has printed. Otherwise (e.g. a file missing on one node) each rank says its own.
    """
    rank = int(os.environ.get("RANK", 0))
    if every_rank_agrees or "RANK" not in os.environ:
        print0(f"error: {message}")
    else:
        print(f"error (rank {rank}): {message}", flush=True)
    compute_cleanup()
    raise SystemExit(0 if every_rank_agrees and rank != 0 else 1)


class DummyWandb:
    """Same calls as a wandb run, doing nothing: used when run == 'dummy'."""

    def log(self, *args, **kwargs):
        pass

    def finish(self):
        pass


def is_not_found(error):
    """True when a download failed because the source has no such file (HTTP 404, missing file:// path)."""
    if isinstance(error, urllib.error.HTTPError):
        return error.code == 404
    return isinstance(error, urllib.error.URLError) and isinstance(error.reason, FileNotFoundError)


def is_permanent(error):
    """True for download errors that asking again will not fix: no such file, or access refused."""
    if isinstance(error, urllib.error.HTTPError):
        return error.code in (401, 403, 404, 410)
    reason = error.reason if isinstance(error, urllib.error.URLError) else error  # file:// sources
    return isinstance(reason, (FileNotFoundError, NotADirectoryError))


def describe_error(error):
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code} {error.reason}"
    if isinstance(error, urllib.error.URLError):
        return f"{type(error.reason).__name__}: {error.reason}"
    return f"{type(error).__name__}: {error}"


def fetch_url_to_file(url, path, retries=5, backoff=1.0, timeout=60, progress=None, check=None, cancel=None):
    """
    Download url (http(s):// or file://) to path through a temporary file in the same folder, renamed
    into place only when complete and, if given, check(temporary path) raised nothing (a ValueError
    from it counts as a failed attempt). Retries with exponential backoff, jittered so that parallel
    downloads do not retry in lockstep; errors that retrying cannot fix (is_permanent) are raised at once.
    progress(bytes_so_far, total_or_None) is called as bytes arrive; a set cancel (threading.Event)
    ends a wait between attempts. Returns the number of bytes written; raises the last error.
    """
    def copy_response(f):
        with urllib.request.urlopen(url, timeout=timeout) as response:
            total = response.headers.get("Content-Length")
            total = int(total) if total is not None else None
            written = 0
            while chunk := response.read(1 << 20):
                f.write(chunk)
                written += len(chunk)
                if progress is not None:
                    progress(written, total)
        if total is not None and written != total:
            raise IOError(f"truncated download: got {written} of {total} bytes")
        if check is not None:
            f.flush()
            check(f.name)

    for attempt in range(1, retries + 1):
        try:
            atomic_write(path, copy_response)  # the temporary file goes on any failure, Ctrl-C included
            return os.path.getsize(path)
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
            if is_permanent(e) or attempt == retries:
                raise
            delay = backoff * 2 ** (attempt - 1) * random.uniform(0.8, 1.2)
            print(f"  {os.path.basename(path)}: attempt {attempt}/{retries} failed ({describe_error(e)}); "
                  f"retrying in {delay:.1f}s", flush=True)
            if cancel is None:
                time.sleep(delay)
            elif cancel.wait(delay):
                raise  # cancelled while waiting


def print_download_progress(label, every_s=5.0):
    """A progress callback for fetch_url_to_file: prints 'label: x of y MB' at most every every_s seconds."""
    last_print = time.time()

    def progress(done, total):
        nonlocal last_print
        if time.time() - last_print >= every_s:
            last_print = time.time()
            of_total = f" of {total / 1e6:.1f}" if total else ""
            print(f"  {label}: {done / 1e6:.1f}{of_total} MB", file=sys.stderr, flush=True)
    return progress


def download_file_with_lock(url, filename, postprocess_fn=None):
    """
    Download url to <base_dir>/filename once (filename may contain folders): the first process takes
    a file lock and downloads, the others wait on the lock and then find the file there.
    postprocess_fn(path) runs once, under the lock, after a fresh download.
    """
    file_path = os.path.join(get_base_dir(), filename)
    if os.path.exists(file_path):
        return file_path
    os.makedirs(os.path.dirname(file_path), exist_ok=True)
    with FileLock(file_path + ".lock"):
        if os.path.exists(file_path):
            return file_path
        print(f"Downloading {url} ...", file=sys.stderr)
        nbytes = fetch_url_to_file(url, file_path, progress=print_download_progress(os.path.basename(filename)))
        print(f"Downloaded {nbytes / 1e6:.1f} MB to {file_path}", file=sys.stderr)
        if postprocess_fn is not None:
            postprocess_fn(file_path)
    return file_path


def atomic_write(path, write_fn, mode="wb"):
    """Write a file via a temporary neighbour and rename, so readers never see it half-written."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
    os.close(fd)
    try:
        with open(tmp_path, mode) as f:  # (f.name is the temporary path)
            write_fn(f)
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise


def format_seconds(seconds):
    """Human-readable duration for progress lines and ETAs."""
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")

