"""Shard download (retries, verification, resume, clear failures) and split iteration, all offline."""

import os
import sys
import shutil
import subprocess

import pytest
import pyarrow.parquet as pq

from nanochat import dataset
from conftest import write_text_parquet

ROWS_PER_GROUP = 3
FAST = ["--backoff", "0.01", "--timeout", "5"]  # retries without waiting


def shard_texts(index, num_docs=7):
    return [f"shard {index} document {j}: " + "lorem ipsum " * (j + 1) for j in range(num_docs)]


def make_source(folder, indices):
    for i in indices:
        write_text_parquet(os.path.join(folder, dataset.shard_filename(i)), shard_texts(i), ROWS_PER_GROUP)


def read_texts(path):
    return pq.read_table(path).column("text").to_pylist()


def data_files(base_dir):
    """The files in base_data besides the record of downloads (manifest.json and its lock)."""
    return sorted(f for f in os.listdir(base_dir / "base_data") if not f.startswith("manifest.json"))


@pytest.fixture
def http_source(file_server, base_dir, monkeypatch):
    """Shards 0..3 on a local HTTP server; shard 3 is the validation shard."""
    make_source(file_server.root, range(4))
    monkeypatch.setenv("NANOCHAT_DATA_URL", file_server.url)
    monkeypatch.setenv("NANOCHAT_DATA_MAX_SHARD", "3")
    return file_server


def test_download_all_with_validation_shard(http_source, base_dir):
    assert dataset.main(["-n", "2", "-w", "3", *FAST]) == 0
    # training shards 0..1 and the validation shard 3, nothing else (no temporary files)
    assert data_files(base_dir) == ["shard_00000.parquet", "shard_00001.parquet", "shard_00003.parquet"]
    for i in (0, 1, 3):
        assert read_texts(base_dir / "base_data" / dataset.shard_filename(i)) == shard_texts(i)
    assert [i for i, _ in dataset.list_split_files("train")] == [0, 1]
    assert [i for i, _ in dataset.list_split_files("val")] == [3]
    assert dataset.get_data_dir() == str(base_dir / "base_data")


def test_valid_shards_are_not_downloaded_again(http_source, base_dir):
    data_dir = base_dir / "base_data"
    data_dir.mkdir()
    shutil.copy(os.path.join(http_source.root, "shard_00000.parquet"), data_dir)
    (data_dir / "shard_00001.parquet").write_bytes(b"PAR1 not really parquet")  # damaged: must be replaced
    assert dataset.main(["-n", "3", *FAST]) == 0
    assert "shard_00000.parquet" not in http_source.requests
    assert sorted(http_source.requests) == ["shard_00001.parquet", "shard_00002.parquet", "shard_00003.parquet"]
    assert read_texts(data_dir / "shard_00001.parquet") == shard_texts(1)
    # a second run finds everything in place and asks the server for nothing
    http_source.requests.clear()
    assert dataset.main(["-n", "3", *FAST]) == 0
    assert http_source.requests == []


def test_server_errors_and_damaged_files_are_retried(http_source, base_dir, capsys):
    http_source.faults = {
        "shard_00000.parquet": ["500", "truncate"],  # error, then a body cut short of its Content-Length
        "shard_00001.parquet": ["short", "short"],  # complete-looking but damaged: caught by the parquet check
        "shard_00003.parquet": ["500"],
    }
    assert dataset.main(["-n", "3", "--retries", "4", *FAST]) == 0
    counts = {name: http_source.requests.count(name) for name in set(http_source.requests)}
    assert counts == {"shard_00000.parquet": 3, "shard_00001.parquet": 3, "shard_00002.parquet": 1,
                      "shard_00003.parquet": 2}
    for i in (0, 1, 2, 3):
        assert read_texts(base_dir / "base_data" / dataset.shard_filename(i)) == shard_texts(i)
    assert data_files(base_dir) == [dataset.shard_filename(i) for i in range(4)]
    out = capsys.readouterr().out
    assert "truncated download" in out and "not a readable parquet file" in out and "HTTP 500" in out


def test_unavailable_shards_are_reported_and_nothing_half_written(http_source, base_dir, capsys):
    os.remove(os.path.join(http_source.root, "shard_00001.parquet"))  # permanent 404
    http_source.faults = {"shard_00002.parquet": ["truncate"] * 10}  # never arrives whole
    assert dataset.main(["-n", "3", "--retries", "3", *FAST]) == 1
    assert http_source.requests.count("shard_00001.parquet") == 1  # 404 is not worth retrying
    assert http_source.requests.count("shard_00002.parquet") == 3
    assert data_files(base_dir) == ["shard_00000.parquet", "shard_00003.parquet"]
    captured = capsys.readouterr()
    assert "shard 1 (shard_00001.parquet) is unavailable: HTTP 404" in captured.out
    assert "shard 2 (shard_00002.parquet) is unavailable: OSError: truncated download" in captured.out
    assert "after 3 attempts" in captured.out
    assert "could not be downloaded: [1, 2]" in captured.err


def test_file_url_source(tmp_path, base_dir, monkeypatch, capsys):
    source = tmp_path / "corpus"
    make_source(source, [0, 1, 5])
    monkeypatch.setenv("NANOCHAT_DATA_URL", f"file://{source}")
    monkeypatch.setenv("NANOCHAT_DATA_MAX_SHARD", "5")
    assert dataset.main(["-n", "2", *FAST]) == 0
    assert data_files(base_dir) == ["shard_00000.parquet", "shard_00001.parquet", "shard_00005.parquet"]
    # asking for more than the source has: the missing file is reported, not retried for long
    assert dataset.main(["-n", "3", *FAST]) == 1
    assert "shard 2 (shard_00002.parquet) is unavailable: FileNotFoundError" in capsys.readouterr().out


def test_command_line_exit_code(tmp_path, base_dir):
    source = tmp_path / "corpus"
    make_source(source, [0, 2])  # validation shard 2 present, training shard 1 missing
    env = dict(os.environ, NANOCHAT_DATA_URL=f"file://{source}", NANOCHAT_DATA_MAX_SHARD="2")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-m", "nanochat.dataset", "-n", "2", *FAST], cwd=repo, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "shard 1 (shard_00001.parquet) is unavailable" in result.stdout
    assert data_files(base_dir) == ["shard_00000.parquet", "shard_00002.parquet"]  # the rest still arrived


def test_leftovers_of_a_killed_run_are_removed(http_source, base_dir):
    data_dir = base_dir / "base_data"
    data_dir.mkdir()
    stale, live = data_dir / "shard_00000.parquet.x1b2c3d4.tmp", data_dir / "shard_00002.parquet.e5f6g7h8.tmp"
    stale.write_bytes(b"half a file")
    live.write_bytes(b"being written by another process right now")
    os.utime(stale, (1e9, 1e9))  # untouched for years
    assert dataset.main(["-n", "1", *FAST]) == 0
    assert not stale.exists() and live.exists()


def test_parquets_iter_batched_strides_row_groups(base_dir, monkeypatch):
    monkeypatch.setenv("NANOCHAT_DATA_MAX_SHARD", "2")
    make_source(base_dir / "base_data", [0, 1, 2, 7])  # shard 7 is beyond MAX_SHARD: in neither split
    groups = lambda i: [t[k:k + ROWS_PER_GROUP] for t in [shard_texts(i)] for k in range(0, len(t), ROWS_PER_GROUP)]
    all_train = groups(0) + groups(1)
    assert list(dataset.parquets_iter_batched("train")) == all_train
    assert list(dataset.parquets_iter_batched("val")) == groups(2)
    # two ranks: every row group exactly once, each rank taking every other row group of each file
    rank0 = list(dataset.parquets_iter_batched("train", start=0, step=2))
    rank1 = list(dataset.parquets_iter_batched("train", start=1, step=2))
    assert rank0 == groups(0)[0::2] + groups(1)[0::2]
    assert rank1 == groups(0)[1::2] + groups(1)[1::2]


def test_missing_data_names_the_download_command(base_dir, monkeypatch):
    monkeypatch.setenv("NANOCHAT_DATA_MAX_SHARD", "4")
    with pytest.raises(FileNotFoundError, match=r"python -m nanochat\.dataset -n"):
        next(dataset.parquets_iter_batched("train"))
    make_source(base_dir / "base_data", [0])
    with pytest.raises(FileNotFoundError, match=r"shard_00004\.parquet.*python -m nanochat\.dataset -n"):
        next(dataset.parquets_iter_batched("val"))
    with pytest.raises(ValueError, match="split must be"):
        next(dataset.parquets_iter_batched("test"))
