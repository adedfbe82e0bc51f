"""
Where task data comes from: the Hugging Face hub's parquet export of each dataset, downloaded once into
<base>/task_data/ and read with the datasets library, plus two plain files (a word list, the identity
conversations). Every source can be pointed elsewhere, e.g. at a local copy for offline runs:

  NANOCHAT_TASKS_URL     a folder (http(s):// or file://) laid out <org>/<name>/<config>/<split>/0000.parquet
  NANOCHAT_WORDS_URL     the English word list, one word per line
  NANOCHAT_IDENTITY_URL  the identity conversations, one JSON list of messages per line
"""

import os

from nanochat.common import get_base_dir, download_file_with_lock, is_not_found, atomic_write
from nanochat.integrity import DamagedFileError, add_to_manifest, file_record, verify_in_manifest

HUB_PARQUET_URL = "https://huggingface.co/datasets/{repo}/resolve/refs%2Fconvert%2Fparquet/{config}/{split}/{shard}"
WORDS_URL = "https://raw.githubusercontent.com/dwyl/english-words/refs/heads/master/words_alpha.txt"
IDENTITY_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/identity_conversations.jsonl"
SHARD_LIST = "shards.txt"  # written once every shard of a split is here; lists them in order


def shard_url(repo, config, split, shard):
    folder = os.environ.get("NANOCHAT_TASKS_URL")
    if folder:
        return f"{folder.rstrip('/')}/{repo}/{config}/{split}/{shard}"
    return HUB_PARQUET_URL.format(repo=repo, config=config, split=split, shard=shard)


def record_download(path):
    """Note a fresh download's size and checksum in its folder's manifest, so later damage is caught on use."""
    add_to_manifest(os.path.dirname(path), {os.path.basename(path): file_record(path)})


def check_parquet(path):
    """A download that is not readable parquet (a truncated file, an HTML error page) is removed, not kept."""
    import pyarrow.parquet as pq
    try:
        pq.ParquetFile(path).metadata
    except Exception as e:
        os.remove(path)
        raise ValueError(f"downloaded {path} is not a readable parquet file ({e}); removed it, "
                         "run again to retry") from e
    record_download(path)


def redownload_hint(path):
    return f"Delete it (rm {path}) and run the same command again: it is downloaded again."


def verify_download(path):
    """A downloaded file as it arrived (DamagedFileError naming it and the fix otherwise)."""
    verify_in_manifest(path, redownload_hint(path))
    return path


def download_split(repo, config, split):
    """
    Local paths of the split's parquet shards 0000.parquet, 0001.parquet, ... (the hub cuts big splits into
    several), fetched once. Shards are probed in order until the source says the next one does not exist.
    """
    folder = os.path.join("task_data", repo, config, split)
    shard_list = os.path.join(get_base_dir(), folder, SHARD_LIST)
    if os.path.exists(shard_list):  # every shard was here once; one deleted since (e.g. damaged) comes again
        with open(shard_list) as f:
            return [download_file_with_lock(shard_url(repo, config, split, name), os.path.join(folder, name),
                                            postprocess_fn=check_parquet) for name in f.read().split()]
    paths = []
    while True:
        shard = f"{len(paths):04d}.parquet"
        try:
            paths.append(download_file_with_lock(shard_url(repo, config, split, shard), os.path.join(folder, shard),
                                                 postprocess_fn=check_parquet))
        except Exception as e:
            if paths and is_not_found(e):
                print(f"  no {shard} there: {repo} {config}/{split} has {len(paths)} shard(s)")
                break  # past the last shard
            raise RuntimeError(f"could not get {repo} {config}/{split} from {shard_url(repo, config, split, shard)}: "
                               f"{e}. Offline? Point NANOCHAT_TASKS_URL at a local copy (see tasks/data.py).") from e
    atomic_write(shard_list, lambda f: f.write("\n".join(os.path.basename(p) for p in paths)), mode="w")
    return paths


def load_split(repo, config, split):
    """
    The split as a datasets.Dataset, shuffled with seed 42 as the reference does right after loading it from the
    hub: the export keeps the hub's row order, so index i here is the reference's index i.
    """
    from datasets import load_dataset
    files = [verify_download(path) for path in download_split(repo, config, split)]
    cache_dir = os.path.join(get_base_dir(), "task_data", "arrow_cache")  # datasets' own cache, kept next to the data
    try:
        return load_dataset("parquet", data_files=files, split="train", cache_dir=cache_dir).shuffle(seed=42)
    except Exception as e:  # a file without a record (downloaded before records existed) that cannot be read
        unreadable = [path for path in files if not _readable_parquet(path)]
        if not unreadable:
            raise
        raise DamagedFileError(unreadable[0], f"it is not readable parquet ({type(e).__name__})",
                               redownload_hint(unreadable[0])) from None


def _readable_parquet(path):
    import pyarrow.parquet as pq
    try:
        pf = pq.ParquetFile(path)
        for i in range(pf.num_row_groups):
            pf.read_row_group(i)
        return True
    except Exception:
        return False


def download_task_file(env_var, default_url, filename):
    """A plain file (word list, identity conversations) from $env_var or default_url, into <base>/task_data/."""
    url = os.environ.get(env_var) or default_url
    try:
        path = download_file_with_lock(url, os.path.join("task_data", filename), postprocess_fn=record_download)
    except Exception as e:
        raise RuntimeError(f"could not get {filename} from {url}: {e}. Offline? Set {env_var} to a local copy.") from e
    return verify_download(path)
