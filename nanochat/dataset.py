"""
The pretraining corpus: parquet shards of raw text, one `text` column, one document per row.

    python -m nanochat.dataset -n 8        # training shards 0..7 plus the validation shard

Shards live in <base>/base_data/shard_{i:05d}.parquet. The source holds shards 0..MAX_SHARD;
the validation split is always shard MAX_SHARD and the training split is every shard with a
smaller index that is on disk (so downloading more shards later never moves the val split).

Environment overrides:
    NANOCHAT_DATA_URL        http(s):// or file:// folder holding the shards (file names are appended)
    NANOCHAT_DATA_MAX_SHARD  index of the last shard of that source (= the validation shard)
"""

import os
import re
import sys
import time
import argparse
import threading
from concurrent.futures import ThreadPoolExecutor, wait, FIRST_COMPLETED

import pyarrow.parquet as pq

from nanochat.common import get_base_dir, fetch_url_to_file, format_seconds, is_permanent, describe_error
from nanochat.integrity import DamagedFileError, add_to_manifest, file_record, record_problem, read_manifest, \
    verify_in_manifest

# FineWeb-Edu-100B, shuffled and re-sharded for nanochat: shards 0..1822, about 100 MB each.
DEFAULT_DATA_URL = "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main"
DEFAULT_MAX_SHARD = 1822

SHARD_NAME = re.compile(r"^shard_(\d{5,})\.parquet$")


def shard_filename(index):
    return f"shard_{index:05d}.parquet"


def get_data_url():
    return (os.environ.get("NANOCHAT_DATA_URL") or DEFAULT_DATA_URL).rstrip("/")


def get_max_shard():
    value = os.environ.get("NANOCHAT_DATA_MAX_SHARD")
    if not value:
        return DEFAULT_MAX_SHARD
    try:
        max_shard = int(value)
    except ValueError:
        max_shard = -1
    if max_shard < 0:
        raise ValueError(f"NANOCHAT_DATA_MAX_SHARD must be a non-negative integer (the index of the validation shard), "
                         f"got {value!r}")
    return max_shard


def get_data_dir():
    data_dir = os.path.join(get_base_dir(), "base_data")
    os.makedirs(data_dir, exist_ok=True)
    return data_dir


def list_parquet_files(data_dir=None):
    """Full paths of all complete shards on disk, sorted by index (temporary files are ignored)."""
    data_dir = get_data_dir() if data_dir is None else data_dir
    names = sorted(f for f in os.listdir(data_dir) if SHARD_NAME.match(f))
    return [os.path.join(data_dir, f) for f in names]


def shard_index(path):
    return int(SHARD_NAME.match(os.path.basename(path)).group(1))


def download_command(num_train=8):
    return f"python -m nanochat.dataset -n {num_train}"


def list_split_files(split):
    """[(shard index, path)] of one split: 'train' = shards below MAX_SHARD on disk, 'val' = shard MAX_SHARD."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    data_dir = get_data_dir()
    max_shard = get_max_shard()
    shards = [(shard_index(p), p) for p in list_parquet_files(data_dir)]
    if split == "train":
        files = [(i, p) for i, p in shards if i < max_shard]
        if not files:
            raise FileNotFoundError(
                f"No training shards in {data_dir}. Download some with: {download_command()} "
                f"(training shards 0..7 plus the validation shard {shard_filename(max_shard)})")
    else:
        files = [(i, p) for i, p in shards if i == max_shard]
        if not files:
            raise FileNotFoundError(
                f"The validation shard {shard_filename(max_shard)} is not in {data_dir}. "
                f"Download it with: {download_command()} (it always comes with the training shards)")
    return files


# -----------------------------------------------------------------------------
# Reading shards. Where a damaged shard is caught, by what it costs over the 240 shards of the speedrun
# (python -m dev.bench_shards): every footer, up front, takes ~40 ms, so a run opens all of its shards'
# footers at the start; a full CRC-32 of all of them would take ~25-40 s (per rank), a full decode 4-6
# minutes, so each shard's checksum is verified when the run comes to it (~0.1 s per 94 MB shard, against
# the minute or so spent training on it), and a damaged row group is reported when it is read.

def repair_hint(path):
    """What to do about a damaged shard: delete it and download it again."""
    index = shard_index(path)
    count = index + 1 if index < get_max_shard() else 0  # -n N fetches training shards 0..N-1 and the val shard
    return f"Delete it and download it again: rm {path} && python -m nanochat.dataset -n {count}"


def open_shard(path, verify=True):
    """
    pq.ParquetFile of a shard whose footer reads; verify=True also checks the whole file against the size
    and CRC-32 recorded when it was downloaded (shards fetched before records existed are not checked).
    """
    if verify:
        verify_in_manifest(path, repair_hint(path))
    try:
        return pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ... for damaged files
        raise DamagedFileError(path, f"it is not a readable parquet file ({e})", repair_hint(path)) from None


def read_texts(pf, path, rg_idx):
    """The `text` column of one row group, as a list of str."""
    try:
        return pf.read_row_group(rg_idx, columns=["text"]).column("text").to_pylist()
    except Exception as e:
        raise DamagedFileError(path, f"row group {rg_idx} is unreadable ({e})", repair_hint(path)) from None


def parquets_iter_batched(split, start=0, step=1):
    """
    Yield the texts (list of str) of one parquet row group at a time, over all files of the split.
    start/step pick every step-th row group of each file, e.g. start=rank, step=world_size.
    """
    for _, path in list_split_files(split):
        pf = open_shard(path)
        for rg_idx in range(start, pf.num_row_groups, step):
            yield read_texts(pf, path, rg_idx)


def check_shard(path, full=True):
    """
    Raise ValueError saying what is wrong unless path is a readable shard with a string `text` column.
    full=False only reads the footer: enough for files we renamed into place after a full check.
    """
    try:
        pf = pq.ParquetFile(path)
        schema = pf.schema_arrow
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ... for damaged files
        raise ValueError(f"not a readable parquet file: {e}") from e
    if "text" not in schema.names:
        raise ValueError(f"no 'text' column (columns: {schema.names})")
    if str(schema.field("text").type) not in ("string", "large_string"):
        raise ValueError(f"column 'text' has type {schema.field('text').type}, expected string")
    if full:
        try:
            for rg_idx in range(pf.num_row_groups):
                pf.read_row_group(rg_idx, columns=["text"])
        except Exception as e:
            raise ValueError(f"row group {rg_idx} is unreadable: {e}") from e


# -----------------------------------------------------------------------------
# Downloading

class DownloadCancelled(Exception):
    pass


class Progress:
    """Byte counters shared by the download threads; estimates speed and time left."""

    def __init__(self, num_shards):
        self.lock = threading.Lock()
        self.start = time.time()
        self.num_shards = num_shards
        self.received = {}  # shard index -> bytes received in its current attempt
        self.sizes = {}  # shard index -> size reported by the source
        self.finished_bytes = 0  # bytes of shards that are done (kept or given up)
        self.finished = set()

    def update(self, index, received, total):
        with self.lock:
            self.received[index] = received
            if total is not None:
                self.sizes[index] = total

    def finish(self, index, nbytes):
        with self.lock:
            self.received.pop(index, None)
            self.finished.add(index)
            self.finished_bytes += nbytes
            if nbytes:
                self.sizes[index] = nbytes

    def summary(self):
        """(bytes so far, bytes/s, eta seconds or None)."""
        with self.lock:
            done = self.finished_bytes + sum(self.received.values())
            elapsed = max(time.time() - self.start, 1e-6)
            rate = done / elapsed
            known = list(self.sizes.values())
            if not known or rate <= 0:
                return done, rate, None
            average = sum(known) / len(known)
            in_flight_left = sum(max(self.sizes.get(i, average) - r, 0) for i, r in self.received.items())
            not_started = self.num_shards - len(self.finished) - len(self.received)
            return done, rate, (in_flight_left + not_started * average) / rate


def download_shards(indices, num_workers=4, retries=5, backoff=2.0, timeout=60, report_every=10.0):
    """
    Make sure the given shards are on disk and readable, downloading the missing ones in parallel.
    Returns {shard index: reason} for the shards that could not be fetched (empty dict on success).
    """
    data_dir = get_data_dir()
    base_url = get_data_url()
    t0 = time.time()

    # Temporary files of a run that was killed outright (kill -9, power loss). A live download writes
    # its file at least every `timeout` seconds, so anything untouched for 10 minutes is an orphan.
    for name in os.listdir(data_dir):
        path = os.path.join(data_dir, name)
        try:
            if name.startswith("shard_") and not SHARD_NAME.match(name) and time.time() - os.path.getmtime(path) > 600:
                os.remove(path)
                print(f"Removed a leftover temporary file: {name}")
        except FileNotFoundError:
            pass  # renamed or removed by its owner meanwhile

    # Valid shards already on disk are kept (a footer check is enough: we only ever rename checked files
    # into place). A damaged file under a shard's name is downloaded again and replaced.
    # A shard whose size differs from the one recorded at its download was cut short since: replaced too.
    todo = []
    records = read_manifest(data_dir)
    for index in indices:
        path = os.path.join(data_dir, shard_filename(index))
        if os.path.exists(path):
            try:
                check_shard(path, full=False)
                problem = record_problem(path, records[shard_filename(index)], full=False) \
                    if shard_filename(index) in records else None
                if problem is None:
                    continue
                print(f"{shard_filename(index)} is on disk but {problem}; downloading it again")
            except ValueError as e:
                print(f"{shard_filename(index)} is on disk but unusable ({e}); downloading it again")
        todo.append(index)
    present = len(indices) - len(todo)
    print(f"Shards wanted: {len(indices)} | already present: {present} | to download: {len(todo)} "
          f"(with {num_workers} workers)")
    print(f"Source: {base_url}")
    print(f"Target: {data_dir}")
    if not todo:
        return {}

    progress = Progress(len(todo))
    cancel = threading.Event()

    def download_shard(index):
        """Fetch one shard, checked readable before it is renamed into place; returns its size in bytes."""
        def on_bytes(received, total):
            if cancel.is_set():
                raise DownloadCancelled()  # stops this download; its temporary file is removed
            progress.update(index, received, total)
        path = os.path.join(data_dir, shard_filename(index))
        nbytes = fetch_url_to_file(f"{base_url}/{shard_filename(index)}", path, retries=retries, backoff=backoff,
                                   timeout=timeout, progress=on_bytes, check=check_shard, cancel=cancel)
        add_to_manifest(data_dir, {shard_filename(index): file_record(path)})  # what a reader checks it against later
        return nbytes

    failures = {}
    downloaded_bytes = 0
    executor = ThreadPoolExecutor(max_workers=max(1, num_workers))
    try:
        futures = {executor.submit(download_shard, i): i for i in todo}
        pending = set(futures)
        completed = 0
        last_line = time.time()
        while pending:
            done, pending = wait(pending, timeout=1.0, return_when=FIRST_COMPLETED)
            for future in done:
                index = futures[future]
                completed += 1
                try:
                    nbytes = future.result()
                    downloaded_bytes += nbytes
                    status = f"{shard_filename(index)} {nbytes / 1e6:.1f} MB"
                except Exception as e:
                    nbytes = 0
                    if is_permanent(e):
                        failures[index] = describe_error(e)
                        status = (f"{shard_filename(index)} FAILED: {failures[index]} "
                                  "(not retried: the source does not have it)")
                    else:
                        failures[index] = f"{describe_error(e)} (after {retries} attempts)"
                        status = f"{shard_filename(index)} FAILED: {failures[index]}"
                progress.finish(index, nbytes)
                total, rate, eta = progress.summary()
                eta_text = format_seconds(eta) if eta is not None else "?"
                print(f"[{completed:{len(str(len(todo)))}d}/{len(todo)}] {status} | total {total / 1e6:.1f} MB at "
                      f"{rate / 1e6:.1f} MB/s | ETA {eta_text}", flush=True)
                last_line = time.time()
            if pending and time.time() - last_line >= report_every:
                total, rate, eta = progress.summary()
                eta_text = format_seconds(eta) if eta is not None else "?"
                print(f"  ... {total / 1e6:.1f} MB so far at {rate / 1e6:.1f} MB/s, "
                      f"{len(pending)} shards left | ETA {eta_text}", flush=True)
                last_line = time.time()
    except KeyboardInterrupt:
        cancel.set()  # workers stop at their next chunk and delete their temporary files
        executor.shutdown(wait=True, cancel_futures=True)
        print("Interrupted: no partial files were left behind; run the same command again to continue.")
        raise
    executor.shutdown(wait=True)

    elapsed = time.time() - t0
    ok = len(todo) - len(failures)
    elapsed_text = f"{elapsed:.1f}s" if elapsed < 60 else format_seconds(elapsed)
    print(f"Done in {elapsed_text}: downloaded {ok}/{len(todo)} shards, {downloaded_bytes / 1e6:.1f} MB "
          f"at {downloaded_bytes / 1e6 / max(elapsed, 1e-6):.1f} MB/s; {present} were already present.")
    for index in sorted(failures):
        print(f"  shard {index} ({shard_filename(index)}) is unavailable: {failures[index]}")
    return failures


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Download pretraining shards: training shards 0..N-1 and the validation shard.")
    parser.add_argument("-n", "--num-files", type=int, default=-1,
                        help="number of training shards (0..N-1) to download; -1 = all of them (default: -1)")
    parser.add_argument("-w", "--num-workers", type=int, default=4, help="parallel downloads (default: 4)")
    parser.add_argument("--retries", type=int, default=5, help="attempts per shard (default: 5)")
    parser.add_argument("--backoff", type=float, default=2.0,
                        help="seconds before the first retry, doubled after each failure (default: 2)")
    parser.add_argument("--timeout", type=float, default=60.0, help="network timeout in seconds (default: 60)")
    args = parser.parse_args(argv)
    if args.num_workers < 1 or args.retries < 1:
        parser.error("--num-workers and --retries must be at least 1")

    max_shard = get_max_shard()
    num_train = max_shard if args.num_files < 0 else min(args.num_files, max_shard)
    indices = list(range(num_train)) + [max_shard]  # the validation shard always comes along
    train_text = f"training shards 0..{num_train - 1}" if num_train > 0 else "no training shards"
    print(f"Wanted: {train_text} and validation shard {max_shard}")
    try:
        failures = download_shards(indices, args.num_workers, args.retries, args.backoff, args.timeout)
    except KeyboardInterrupt:
        return 130
    if failures:
        print(f"ERROR: {len(failures)} shard(s) could not be downloaded: {sorted(failures)}. "
              f"Check NANOCHAT_DATA_URL={get_data_url()} and NANOCHAT_DATA_MAX_SHARD={max_shard}, then rerun.",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
