"""Checkpoint files: layout, atomic round trip, rebuilding a model, finding the latest one, clear errors."""

import json
import os
import random

import pytest
import torch

from nanochat.checkpoint_manager import (build_model, find_largest_model, find_last_step, list_steps, load_checkpoint,
                                         load_model, save_checkpoint)
from nanochat.gpt import GPTConfig, build_gpt
from nanochat.tokenizer import RustBPETokenizer

VOCAB = 300


@pytest.fixture
def base_dir(tmp_path, monkeypatch):
    """A base dir with a tiny tokenizer (build_model checks the model against it)."""
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "kappa", "omega", "sigma", "tau", "rho", "phi"]
    texts = [" ".join(rng.choice(words) for _ in range(60)) for _ in range(100)]
    RustBPETokenizer.train_from_iterator(iter(texts), VOCAB).save(os.path.join(str(tmp_path), "tokenizer"))
    return str(tmp_path)


def tiny_model(vocab_size=VOCAB, seed=0):
    config = dict(sequence_len=32, vocab_size=vocab_size, n_layer=1, n_head=1, n_kv_head=1, n_embd=64)
    torch.manual_seed(seed)
    model = build_gpt(GPTConfig(**config))
    with torch.no_grad():  # init leaves lm_head/c_proj at zero: give every weight a value worth comparing
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model, config


def meta_for(config, step):
    return {"step": step, "val_bpb": 1.5, "model_config": config, "user_config": {"depth": 1},
            "device_batch_size": 2, "max_seq_len": 32, "dataloader_state_dict": {"shard": 0},
            "loop_state": {"min_val_bpb": 1.5, "smooth_train_loss": 3.0, "total_training_time": 1.0}}


def test_round_trip_and_layout(tmp_path):
    model, config = tiny_model()
    optimizer_data = [{"state": {0: {"exp_avg": torch.randn(3, 4)}}, "param_groups": [{"lr": 0.1}]}]
    folder = str(tmp_path / "d1")
    save_checkpoint(folder, 12, model.state_dict(), optimizer_data, meta_for(config, 12), rank=0)
    save_checkpoint(folder, 12, None, [{"rank": 1}], None, rank=1)  # another rank: only its optimizer shard
    assert sorted(os.listdir(folder)) == ["meta_000012.json", "model_000012.pt", "optim_000012_rank0.pt",
                                          "optim_000012_rank1.pt"]
    model_data, loaded_opt, meta = load_checkpoint(folder, 12, "cpu", load_optimizer=True)
    assert model_data.keys() == model.state_dict().keys()
    assert all(torch.equal(model_data[k], v) for k, v in model.state_dict().items())
    assert torch.equal(loaded_opt[0]["state"][0]["exp_avg"], optimizer_data[0]["state"][0]["exp_avg"])
    assert meta == json.loads(json.dumps(meta_for(config, 12)))
    assert load_checkpoint(folder, 12, "cpu", load_optimizer=True, rank=1)[1] == [{"rank": 1}]
    assert load_checkpoint(folder, 12, "cpu")[1] is None
    with pytest.raises(FileNotFoundError, match="same number of processes"):
        load_checkpoint(folder, 12, "cpu", load_optimizer=True, rank=2)
    with pytest.raises(FileNotFoundError, match="saved steps there: 12"):
        load_checkpoint(folder, 7, "cpu")


def test_build_model_gives_the_same_logits_and_strips_compile_prefix(base_dir):
    model, config = tiny_model()
    model.eval()
    idx = torch.randint(0, VOCAB, (2, 16))
    expected = model(idx)
    folder = os.path.join(base_dir, "base_checkpoints", "d1")
    # as a torch.compile'd model saves it
    compiled_keys = {"_orig_mod." + k: v for k, v in model.state_dict().items()}
    save_checkpoint(folder, 5, compiled_keys, None, meta_for(config, 5))
    rebuilt, tokenizer, meta = build_model(folder, 5, torch.device("cpu"), phase="eval")
    assert not rebuilt.training and meta["step"] == 5 and tokenizer.get_vocab_size() == VOCAB
    assert torch.equal(rebuilt(idx), expected)
    assert build_model(folder, 5, "cpu", phase="train")[0].training
    with pytest.raises(ValueError, match="phase"):
        build_model(folder, 5, "cpu", phase="test")


def test_bf16_weights_load_as_fp32_on_cpu(base_dir):
    model, config = tiny_model()
    folder = os.path.join(base_dir, "base_checkpoints", "d1")
    save_checkpoint(folder, 1, {k: v.bfloat16() for k, v in model.state_dict().items()}, None, meta_for(config, 1))
    rebuilt, _, _ = build_model(folder, 1, "cpu", phase="eval")
    assert all(p.dtype == torch.float32 for p in rebuilt.parameters())


def test_vocab_mismatch_is_explained(base_dir):
    model, config = tiny_model(vocab_size=320)
    folder = os.path.join(base_dir, "base_checkpoints", "d1")
    save_checkpoint(folder, 1, model.state_dict(), None, meta_for(config, 1))
    with pytest.raises(ValueError, match="trained with 320"):
        build_model(folder, 1, "cpu", phase="eval")


def test_find_largest_model_and_last_step(base_dir):
    model, config = tiny_model()
    root = os.path.join(base_dir, "base_checkpoints")
    for tag, steps in (("d4", [10]), ("d12", [3, 20, 7]), ("custom", [1])):
        for step in steps:
            save_checkpoint(os.path.join(root, tag), step, model.state_dict(), None, meta_for(config, step))
    # a model file without its meta file is an interrupted save: not a checkpoint
    torch.save({}, os.path.join(root, "d12", "model_000099.pt"))
    assert find_largest_model(root) == "d12"
    assert find_last_step(os.path.join(root, "d12")) == 20
    _, _, meta = load_model("base", "cpu", "eval")
    assert meta["step"] == 20
    _, _, meta = load_model("base", "cpu", "eval", model_tag="d12", step=7)
    assert meta["step"] == 7


def test_load_model_without_checkpoints_names_the_training_command(base_dir):
    with pytest.raises(FileNotFoundError, match="python -m scripts.base_train"):
        load_model("base", "cpu", "eval")
    os.makedirs(os.path.join(base_dir, "base_checkpoints", "d4"))
    with pytest.raises(FileNotFoundError, match="python -m scripts.base_train"):
        load_model("base", "cpu", "eval", model_tag="d6")
    with pytest.raises(FileNotFoundError, match="python -m scripts.chat_sft"):
        load_model("sft", "cpu", "eval")
    with pytest.raises(ValueError, match="source must be one of"):
        load_model("pre", "cpu", "eval")


# ---------------------------------------------------------------------------------------------
# a 2-rank save killed between its writes leaves the previous step as the latest


def save_killed_midway(rank, init_file, folder, kill_point):
    """Save step 1 on 2 gloo ranks, then step 2 with this process dying (os._exit) at kill_point."""
    import datetime
    import torch.distributed as dist
    from nanochat import checkpoint_manager
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=30))
    model, config = tiny_model(seed=0)
    optimizer_data = [{"state": {0: {"exp_avg": torch.full((4,), float(rank))}}, "param_groups": [{"lr": 0.1}]}]
    save_checkpoint(folder, 1, model.state_dict(), optimizer_data, meta_for(config, 1), rank=rank, world_size=2)
    real_write_recorded, real_atomic_write = checkpoint_manager.write_recorded, checkpoint_manager.atomic_write

    def write_recorded(path, write_fn):
        if kill_point == (rank, os.path.basename(path)):
            os._exit(9)  # killed before writing this file
        return real_write_recorded(path, write_fn)

    def atomic_write(path, write_fn, mode="wb"):
        if kill_point == (rank, os.path.basename(path)):
            os._exit(9)
        return real_atomic_write(path, write_fn, mode)

    checkpoint_manager.write_recorded, checkpoint_manager.atomic_write = write_recorded, atomic_write
    # the surviving rank fails in the exchange (its peer is gone): that is fine, it is being killed too
    save_checkpoint(folder, 2, model.state_dict(), optimizer_data, meta_for(config, 2), rank=rank, world_size=2)
    dist.destroy_process_group()


@pytest.mark.parametrize("kill_point", [(1, "optim_000002_rank1.pt"), (0, "model_000002.pt"), (0, "meta_000002.json")],
                         ids=["before-rank1-shard", "before-model", "before-meta"])
def test_a_save_killed_between_writes_leaves_the_previous_step_latest(tmp_path, kill_point):
    import multiprocessing as mp
    folder = str(tmp_path / "d1")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=save_killed_midway, args=(rank, str(tmp_path / "init"), folder, kill_point))
             for rank in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        if p.is_alive():
            p.kill()
    assert any(p.exitcode == 9 for p in procs)
    files = os.listdir(folder)
    assert "meta_000001.json" in files and "meta_000002.json" not in files
    assert not any(name.endswith(".tmp") for name in files)  # no half-written file left behind
    assert list_steps(folder) == [1] and find_last_step(folder) == 1
    for rank in range(2):
        _, optimizer_data, meta = load_checkpoint(folder, 1, "cpu", load_optimizer=True, rank=rank)
        assert meta["step"] == 1 and optimizer_data[0]["state"][0]["exp_avg"][0].item() == rank
