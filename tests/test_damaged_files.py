"""
Damaged files: every file the project reads back, cut short or with one flipped bit, stops the
reader with a DamagedFileError that names the file and the command that fixes it, and leaves
every other file on disk as it was. The scripts exit with code 1 and no traceback.
"""

import json
import os
import random
import zlib

import pytest
import torch

from nanochat.checkpoint_manager import list_steps, load_checkpoint, load_model, save_checkpoint
from nanochat.gpt import GPTConfig, build_gpt
from nanochat.integrity import DamagedFileError, file_record, write_recorded
from nanochat.tokenizer import RustBPETokenizer, get_token_bytes, get_tokenizer

VOCAB = 300


def truncate(path):
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[:len(data) // 2])


def flip_bit(path, position=0.5):
    """Flip one bit of the byte at `position` (a fraction of the file length)."""
    with open(path, "rb") as f:
        data = bytearray(f.read())
    data[int(len(data) * position)] ^= 0x04
    with open(path, "wb") as f:
        f.write(data)


DAMAGES = {"truncated": truncate, "bit-flipped": flip_bit}


def snapshot(root):
    """{relative path: (size, crc32)} of every file under root."""
    files = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, root)] = (os.path.getsize(path), zlib.crc32(f.read()))
    return files


def expect_damaged(call, path, fix):
    """call() must raise DamagedFileError naming path and containing fix; returns the message."""
    with pytest.raises(DamagedFileError) as info:
        call()
    message = str(info.value)
    assert info.value.path == str(path) and str(path) in message, message
    assert fix in message, message
    return message


# ---------------------------------------------------------------------------------------------
# the helper itself


def test_recorded_write_matches_the_file_and_exits_without_traceback(tmp_path):
    path = tmp_path / "x.pt"
    record = write_recorded(path, lambda f: torch.save({"w": torch.arange(1000)}, f))
    assert record == file_record(path) and record["size"] == os.path.getsize(path)
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.arange(1000))
    error = DamagedFileError(path, "it is cut short", "Run the fix.")
    assert isinstance(error, SystemExit) and error.code == f"error: {path} is damaged: it is cut short.\nRun the fix."


# ---------------------------------------------------------------------------------------------
# tokenizer.pkl, token_bytes.pt and their manifest


@pytest.fixture
def tokenizer_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "kappa", "omega", "sigma", "tau", "rho", "phi"]
    texts = [" ".join(rng.choice(words) for _ in range(60)) for _ in range(100)]
    folder = tmp_path / "tokenizer"
    RustBPETokenizer.train_from_iterator(iter(texts), VOCAB).save(str(folder))
    return folder


@pytest.mark.parametrize("damage", DAMAGES)
@pytest.mark.parametrize("name", ["tokenizer.pkl", "token_bytes.pt", "manifest.json"])
def test_damaged_tokenizer_files(tokenizer_dir, name, damage):
    assert get_tokenizer().get_vocab_size() == VOCAB and get_token_bytes().shape == (VOCAB,)
    DAMAGES[damage](tokenizer_dir / name)
    before = snapshot(tokenizer_dir.parent)
    load = get_token_bytes if name == "token_bytes.pt" else get_tokenizer
    expect_damaged(load, tokenizer_dir / name, "python -m scripts.tok_train")
    assert snapshot(tokenizer_dir.parent) == before


def test_tokenizer_without_manifest_still_loads_and_truncation_is_still_named(tokenizer_dir):
    os.remove(tokenizer_dir / "manifest.json")  # as the reference writes the folder
    assert get_tokenizer().get_vocab_size() == VOCAB and get_token_bytes().shape == (VOCAB,)
    truncate(tokenizer_dir / "tokenizer.pkl")
    truncate(tokenizer_dir / "token_bytes.pt")
    expect_damaged(get_tokenizer, tokenizer_dir / "tokenizer.pkl", "python -m scripts.tok_train")
    expect_damaged(get_token_bytes, tokenizer_dir / "token_bytes.pt", "python -m scripts.tok_train")


# ---------------------------------------------------------------------------------------------
# checkpoints


def tiny_model_data(seed):
    torch.manual_seed(seed)
    config = dict(sequence_len=32, vocab_size=VOCAB, n_layer=1, n_head=1, n_kv_head=1, n_embd=64)
    model = build_gpt(GPTConfig(**config))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model.state_dict(), config


def save_step(folder, step):
    model_data, config = tiny_model_data(step)
    optimizer_data = [{"state": {0: {"exp_avg": torch.randn(64, 64)}},
                       "param_groups": [{"lr": 0.1, "betas": (0.8, 0.95)}]}]
    meta = {"step": step, "model_config": config, "loop_state": {"min_val_bpb": float("inf")}}
    save_checkpoint(str(folder), step, model_data, optimizer_data, meta)
    return model_data


@pytest.fixture
def checkpoints(tokenizer_dir):
    """base_checkpoints/d1 with steps 5 and 10 (model, optimizer shard, meta)."""
    folder = tokenizer_dir.parent / "base_checkpoints" / "d1"
    save_step(folder, 5)
    save_step(folder, 10)
    return folder


def test_meta_records_every_file_and_load_returns_the_meta_as_given(checkpoints):
    with open(checkpoints / "meta_000010.json") as f:
        saved = json.load(f)
    assert sorted(saved["files"]) == ["model_000010.pt", "optim_000010_rank0.pt"]
    for name, record in saved["files"].items():
        assert record == file_record(checkpoints / name)
    _, optimizer_data, meta = load_checkpoint(str(checkpoints), 10, "cpu", load_optimizer=True)
    assert meta == {"step": 10, "model_config": saved["model_config"], "loop_state": {"min_val_bpb": float("inf")}}
    assert optimizer_data[0]["param_groups"][0]["betas"] == (0.8, 0.95)


@pytest.mark.parametrize("damage", DAMAGES)
@pytest.mark.parametrize("name", ["model_000010.pt", "optim_000010_rank0.pt", "meta_000010.json"])
def test_damaged_checkpoint_names_the_file_and_the_last_intact_step(checkpoints, name, damage):
    DAMAGES[damage](checkpoints / name)
    before = snapshot(checkpoints.parent.parent)
    expect_damaged(lambda: load_checkpoint(str(checkpoints), 10, "cpu", load_optimizer=True, rank=0),
                   checkpoints / name, "resume with --resume_from_step=5")
    if name != "optim_000010_rank0.pt":  # loading a model for evaluation does not read the optimizer
        # the newest step is damaged: loading it says so, rather than quietly taking step 5
        expect_damaged(lambda: load_model("base", "cpu", "eval"), checkpoints / name, "load it with --step=5")
    assert snapshot(checkpoints.parent.parent) == before
    assert load_model("base", "cpu", "eval", step=5)[2]["step"] == 5  # the intact step is still usable


def test_list_steps_leaves_out_steps_with_missing_or_cut_files(checkpoints, capsys):
    assert list_steps(str(checkpoints)) == [5, 10]
    truncate(checkpoints / "model_000010.pt")
    assert list_steps(str(checkpoints)) == [5]
    assert "skipping step 10" in capsys.readouterr().err
    os.remove(checkpoints / "model_000005.pt")
    assert list_steps(str(checkpoints)) == []
    message = expect_damaged(lambda: load_checkpoint(str(checkpoints), 10, "cpu"), checkpoints / "model_000010.pt",
                             "No earlier step")
    assert "is intact" in message


def test_checkpoints_without_records_still_load(checkpoints):
    """A step saved before sizes and checksums were recorded: loads unchecked; an unreadable file is still named."""
    for step in (5, 10):
        path = checkpoints / f"meta_{step:06d}.json"
        meta = json.loads(path.read_text())
        del meta["files"], meta["checksum"]
        path.write_text(json.dumps(meta))
    expected = tiny_model_data(10)[0]
    model_data, _, meta = load_checkpoint(str(checkpoints), 10, "cpu", load_optimizer=True)
    assert meta["step"] == 10 and all(torch.equal(model_data[k], v) for k, v in expected.items())
    assert list_steps(str(checkpoints)) == [5, 10]
    truncate(checkpoints / "model_000010.pt")
    expect_damaged(lambda: load_checkpoint(str(checkpoints), 10, "cpu"), checkpoints / "model_000010.pt",
                   "load it with --step=5")


# ---------------------------------------------------------------------------------------------
# downloaded task data (tasks/): recorded when downloaded, checked when read

from test_tasks import hub  # noqa: E402,F401  (the served hub-style folder, as a fixture)


@pytest.mark.parametrize("damage", DAMAGES)
def test_damaged_task_data_is_named_and_comes_back_once_deleted(hub, base_dir, damage):
    from tasks.arc import ARC
    from tasks.spellingbee import SpellingBee
    examples = [ARC("ARC-Easy", "train")[i] for i in range(5)]
    words = SpellingBee(size=5)[0]
    arc_file = base_dir / "task_data/allenai/ai2_arc/ARC-Easy/train/0000.parquet"
    for path, load in ((arc_file, lambda: ARC("ARC-Easy", "train")),
                       (base_dir / "task_data/words_alpha.txt", lambda: SpellingBee(size=5))):
        DAMAGES[damage](path)
        before = snapshot(base_dir)
        expect_damaged(load, path, f"rm {path}")
        assert snapshot(base_dir) == before
        os.remove(path)  # what the message says to do
    assert [ARC("ARC-Easy", "train")[i] for i in range(5)] == examples and SpellingBee(size=5)[0] == words


# ---------------------------------------------------------------------------------------------
# the CORE eval bundle: the zip (checked by its own CRCs when unpacked) and the unpacked files (by a manifest
# made from the zip's records)


@pytest.fixture
def bundle_zip(tmp_path, monkeypatch):
    import shutil
    from test_core_eval import make_bundle
    base = tmp_path / "base"
    base.mkdir()
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    source = make_bundle(str(tmp_path / "source"))
    zip_path = shutil.make_archive(str(tmp_path / "bundle"), "zip", root_dir=os.path.dirname(source),
                                   base_dir="eval_bundle")
    monkeypatch.setenv("NANOCHAT_EVAL_BUNDLE_URL", zip_path)
    return base


@pytest.mark.parametrize("damage", DAMAGES)
@pytest.mark.parametrize("name", ["core.yaml", "eval_meta_data.csv", "eval_data/mc.jsonl"])
def test_damaged_unpacked_bundle_file(bundle_zip, name, damage):
    from nanochat.core_eval import ensure_eval_bundle, load_bundle
    bundle_dir = ensure_eval_bundle()
    tasks, _ = load_bundle(bundle_dir)
    DAMAGES[damage](os.path.join(bundle_dir, name))
    before = snapshot(bundle_zip)
    expect_damaged(ensure_eval_bundle, os.path.join(bundle_dir, name), f"rm -r {bundle_dir}")
    assert snapshot(bundle_zip) == before
    import shutil
    shutil.rmtree(bundle_dir)  # what the message says to do
    assert load_bundle(ensure_eval_bundle())[0] == tasks


@pytest.mark.parametrize("damage", DAMAGES)
def test_damaged_bundle_zip(bundle_zip, damage):
    import shutil
    from nanochat.core_eval import ensure_eval_bundle
    bundle_dir = ensure_eval_bundle()
    shutil.rmtree(bundle_dir)
    zip_path = bundle_zip / "eval_bundle.zip"
    DAMAGES[damage](zip_path)
    before = snapshot(bundle_zip)
    expect_damaged(ensure_eval_bundle, zip_path, f"rm {zip_path}")
    assert snapshot(bundle_zip) == before
    os.remove(zip_path)
    assert ensure_eval_bundle() == bundle_dir


# ---------------------------------------------------------------------------------------------
# the scripts: a damaged shard, checkpoint or tokenizer stops them with exit code 1, the message, no traceback

import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def trained_base(tmp_path_factory):
    """Shards (recorded in base_data/manifest.json, as downloads are), a tokenizer, checkpoints at steps 3 and 6."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from nanochat.integrity import add_to_manifest
    from conftest import make_documents
    from test_base_train import TOY, run_train
    base = tmp_path_factory.mktemp("trained")
    rng = random.Random(0)
    data = base / "base_data"
    data.mkdir()
    for shard in range(4):
        path = data / f"shard_{shard:05d}.parquet"
        pq.write_table(pa.table({"text": make_documents(rng, 64)}), path, row_group_size=8)
        add_to_manifest(str(data), {path.name: file_record(path)})
    RustBPETokenizer.train_from_iterator(iter(make_documents(rng, 200)), VOCAB).save(str(base / "tokenizer"))
    saved = {k: os.environ.get(k) for k in ("NANOCHAT_BASE_DIR", "NANOCHAT_DATA_MAX_SHARD")}
    os.environ.update(NANOCHAT_BASE_DIR=str(base), NANOCHAT_DATA_MAX_SHARD="3")
    try:
        assert run_train([*TOY, "--model_tag=d2", "--save_every=3"]) == 0
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    return base


SCRIPT_CASES = {
    # name: (file to damage, command, what the fix must say)
    "shard/base_train": ("base_data/shard_00000.parquet", ["scripts.base_train", "--model_tag=fresh"],
                         "rm {base}/base_data/shard_00000.parquet && python -m nanochat.dataset -n 1"),
    "model/base_train": ("base_checkpoints/d2/model_000006.pt",
                         ["scripts.base_train", "--model_tag=d2", "--resume_from_step=6"], "--resume_from_step=3"),
    "optimizer/base_train": ("base_checkpoints/d2/optim_000006_rank0.pt",
                             ["scripts.base_train", "--model_tag=d2", "--resume_from_step=6"], "--resume_from_step=3"),
    "model/sample": ("base_checkpoints/d2/model_000006.pt", ["scripts.sample", "--device_type=cpu", "--max_tokens=4"],
                     "--step=3"),
    "tokenizer/tok_eval": ("tokenizer/tokenizer.pkl", ["scripts.tok_eval", "--no_baselines"],
                           "python -m scripts.tok_train"),
    "token_bytes/base_train": ("tokenizer/token_bytes.pt", ["scripts.base_train", "--model_tag=fresh"],
                               "python -m scripts.tok_train"),
}


@pytest.mark.slow
@pytest.mark.parametrize("damage", DAMAGES)
@pytest.mark.parametrize("case", SCRIPT_CASES)
def test_scripts_stop_with_the_file_and_the_fix(trained_base, tmp_path, case, damage):
    from test_base_train import TOY
    base = tmp_path / "base"
    shutil.copytree(trained_base, base)
    name, command, fix = SCRIPT_CASES[case]
    DAMAGES[damage](base / name)
    before = snapshot(base)
    args = [*command, *TOY] if command[0] == "scripts.base_train" else command
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base), NANOCHAT_DATA_MAX_SHARD="3", PYTHONPATH=REPO_ROOT)
    result = subprocess.run([sys.executable, "-m", *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    assert f"{base / name} is damaged" in result.stderr and fix.format(base=base) in result.stderr, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert snapshot(base) == before


def test_downloads_are_recorded_and_a_cut_shard_is_fetched_again(tmp_path, monkeypatch, capsys):
    """The downloader records each shard; a shard cut short since is noticed and replaced by the next download."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from nanochat import dataset
    from nanochat.integrity import read_manifest
    source = tmp_path / "source"
    source.mkdir()
    for i in range(3):
        pq.write_table(pa.table({"text": [f"doc {i} {j}" for j in range(5000)]}), source / f"shard_{i:05d}.parquet",
                       row_group_size=1000)
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    monkeypatch.setenv("NANOCHAT_DATA_URL", f"file://{source}")
    monkeypatch.setenv("NANOCHAT_DATA_MAX_SHARD", "2")
    assert dataset.main(["-n", "2"]) == 0
    data = tmp_path / "base" / "base_data"
    records = read_manifest(str(data))
    assert records == {f"shard_{i:05d}.parquet": file_record(data / f"shard_{i:05d}.parquet") for i in range(3)}
    flip_bit(data / "shard_00001.parquet")
    expect_damaged(lambda: list(dataset.parquets_iter_batched("train")), data / "shard_00001.parquet",
                   f"rm {data / 'shard_00001.parquet'} && python -m nanochat.dataset -n 2")
    path = data / "shard_00001.parquet"  # bytes lost in the middle: header and footer still read, the size is off
    content = path.read_bytes()
    path.write_bytes(content[:len(content) // 3] + content[len(content) // 3 + 100:])
    capsys.readouterr()
    assert dataset.main(["-n", "2"]) == 0
    assert "shard_00001.parquet is on disk but it has" in capsys.readouterr().out
    assert read_manifest(str(data)) == records and len(list(dataset.parquets_iter_batched("train"))) == 10
