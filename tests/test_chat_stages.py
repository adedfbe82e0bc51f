"""
scripts/mid_train.py and scripts/chat_sft.py at toy size, on task data generated here in the hub's
parquet layout (served through NANOCHAT_TASKS_URL=file://...), from a tiny base checkpoint: they train,
save, log, and a run stopped by Ctrl-C and resumed (where the start-up measurements would now choose
otherwise) equals the uninterrupted run, weights included.
chat_eval then scores the fine-tuned model on every task and writes its report section.
"""

import json
import os
import random
import runpy
import signal
import sys

import pytest
import torch

from toy_task_data import WORDS, write_task_data
from conftest import environment

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 300
MID = ["--device_type=cpu", "--dtype=float32", "--compile=false", "--max_seq_len=32", "--device_batch_size=2",
       "--total_batch_size=64", "--num_iterations=6", "--eval_every=3", "--eval_tokens=128"]
SFT = ["--device_type=cpu", "--dtype=float32", "--num_iterations=6", "--device_batch_size=2",
       "--target_examples_per_step=4", "--max_seq_len=48", "--eval_every=3", "--eval_steps=2", "--eval_metrics_every=3",
       "--eval_metrics_max_problems=4"]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tokenizer, a tiny base checkpoint (fresh weights) and the task data, in their own NANOCHAT_BASE_DIR."""
    from nanochat.checkpoint_manager import save_checkpoint
    from nanochat.gpt import GPTConfig, build_gpt
    from nanochat.tokenizer import RustBPETokenizer

    base = str(tmp_path_factory.mktemp("chat_base"))
    data = os.path.join(base, "served")
    rng = random.Random(0)
    write_task_data(data, rng)
    texts = [" ".join(rng.choice(WORDS) for _ in range(40)) + " ABCD 0123456789 who are you?" for _ in range(60)]
    RustBPETokenizer.train_from_iterator(iter(texts), VOCAB).save(os.path.join(base, "tokenizer"))
    torch.manual_seed(0)
    config = dict(sequence_len=32, vocab_size=VOCAB, n_layer=1, n_head=1, n_kv_head=1, n_embd=64)
    model = build_gpt(GPTConfig(**config))
    save_checkpoint(os.path.join(base, "base_checkpoints", "d1"), 5, model.state_dict(), None,
                    {"step": 5, "model_config": config, "user_config": {}, "device_batch_size": 2, "max_seq_len": 32})
    env = {"NANOCHAT_BASE_DIR": base, "NANOCHAT_TASKS_URL": f"file://{data}",
           "NANOCHAT_WORDS_URL": f"file://{data}/words_alpha.txt",
           "NANOCHAT_IDENTITY_URL": f"file://{data}/identity_conversations.jsonl"}
    with environment(**env):
        yield base


def run_script(module, args):
    """Run `python -m module ARGS` in this process; returns its exit code."""
    saved_argv = sys.argv
    saved_handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    sys.argv = [module, *args]
    try:
        runpy.run_module(module, run_name="__main__")
        return 0
    except SystemExit as e:
        return e.code
    finally:
        sys.argv = saved_argv
        for s, handler in saved_handlers.items():
            signal.signal(s, handler)


def read_log(folder):
    with open(os.path.join(folder, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def interrupt_train_loader(monkeypatch, name, at_batch):
    """Replace nanochat.chat_dataloader.<name> so that the first loader (the training one) sends SIGINT at a batch."""
    import nanochat.chat_dataloader as chat_dataloader
    real = getattr(chat_dataloader, name)
    calls = []

    def loader(*args, **kwargs):  # a plain function: the first call is counted when made, not when first read
        first = not calls
        calls.append(1)

        def batches():
            for i, batch in enumerate(real(*args, **kwargs)):
                if first and i == at_batch and kwargs.get("resume_state") is None:
                    os.kill(os.getpid(), signal.SIGINT)
                yield batch
        return batches()

    monkeypatch.setattr(chat_dataloader, name, loader)


def copy_checkpoint(base, folder, tag, new_tag):
    """The same starting weights under another model tag (mid_train and chat_sft write under the tag they read)."""
    import shutil
    shutil.copytree(os.path.join(base, folder, tag), os.path.join(base, folder, new_tag))


def assert_same_run(full_folder, split_folder, step):
    """Same losses at every step, same evaluations, bit-identical final weights."""
    full, split = read_log(full_folder), read_log(split_folder)
    steps = lambda log: {r["step"]: r.get("raw_loss", r.get("loss")) for r in log if "dt" in r}
    evals = lambda log: [r for r in log if "dt" not in r]
    assert sorted(steps(split)) == list(range(step))
    assert steps(split) == steps(full)
    assert evals(split) == evals(full)
    a = torch.load(os.path.join(full_folder, f"model_{step:06d}.pt"))
    b = torch.load(os.path.join(split_folder, f"model_{step:06d}.pt"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def mid_run(base_dir):
    assert run_script("scripts.mid_train", [*MID, "--model_tag=d1"]) == 0
    return os.path.join(base_dir, "mid_checkpoints", "d1")


def test_mid_train_trains_saves_and_reports(base_dir, mid_run):
    assert {"model_000006.pt", "meta_000006.json", "optim_000006_rank0.pt", "log.jsonl"} <= set(os.listdir(mid_run))
    meta = json.load(open(os.path.join(mid_run, "meta_000006.json")))
    assert meta["base_step"] == 5 and meta["model_config"]["n_layer"] == 1
    log = read_log(mid_run)
    train = [r for r in log if "dt" in r]
    assert [r["step"] for r in train] == list(range(6))
    assert [r["step"] for r in log if "val_bpb" in r] == [0, 3, 6]
    assert train[0]["raw_loss"] == pytest.approx(torch.log(torch.tensor(float(VOCAB))).item(), abs=1e-4)  # zero lm_head
    assert train[-1]["raw_loss"] < train[0]["raw_loss"] - 0.5  # it learns
    # flat, then linear to 0 over the last 20% (progress = step / num_iterations)
    assert [r["lr_mult"] for r in train] == pytest.approx([1, 1, 1, 1, 1, (1 - 5 / 6) / 0.2])
    assert "Minimum validation bpb" in open(os.path.join(base_dir, "report", "midtraining.md")).read()


def assert_saved_choices_made(folder, step, final_step):
    """The resumed run made the machine choices of the step it resumed from, and saved them again."""
    saved = json.load(open(os.path.join(folder, f"meta_{step:06d}.json")))["loop_state"]["machine_choices"]
    final = json.load(open(os.path.join(folder, f"meta_{final_step:06d}.json")))["loop_state"]["machine_choices"]
    assert final == saved and torch.get_num_threads() == saved["threads"]


def test_mid_train_ctrl_c_then_resume_is_exact(base_dir, mid_run, monkeypatch, another_machine):
    copy_checkpoint(base_dir, "base_checkpoints", "d1", "split")
    interrupt_train_loader(monkeypatch, "packed_conversation_loader", at_batch=3)  # batch 0 up front, batch 3 in step 2
    assert run_script("scripts.mid_train", [*MID, "--model_tag=split"]) == 0
    folder = os.path.join(base_dir, "mid_checkpoints", "split")
    assert sorted(f for f in os.listdir(folder) if f.startswith("model_")) == ["model_000003.pt"]
    another_machine()
    assert run_script("scripts.mid_train", [*MID, "--model_tag=split", "--resume_from_step=3"]) == 0
    assert_same_run(mid_run, folder, 6)
    assert_saved_choices_made(folder, 3, 6)


@pytest.fixture(scope="module")
def sft_run(base_dir, mid_run):
    assert run_script("scripts.chat_sft", [*SFT, "--model_tag=d1"]) == 0
    return os.path.join(base_dir, "chatsft_checkpoints", "d1")


def test_chat_sft_trains_saves_and_reports(base_dir, sft_run):
    files = set(os.listdir(sft_run))
    assert {"model_000006.pt", "meta_000006.json", "log.jsonl"} <= files
    assert "optim_000006_rank0.pt" not in files  # the final model is for chatting
    meta = json.load(open(os.path.join(sft_run, "meta_000006.json")))
    assert meta["source"] == "mid" and meta["source_step"] == 6
    log = read_log(sft_run)
    train = [r for r in log if "dt" in r]
    assert [r["step"] for r in train] == list(range(6))
    assert [r["lr_mult"] for r in train] == pytest.approx([1 - s / 6 for s in range(6)])
    assert [r["step"] for r in log if "val_loss" in r] == [0, 3, 6]
    assert [r["step"] for r in log if "mmlu_acc" in r] == [3, 6]
    assert all(0 < r["num_tokens"] <= r["tokens"] for r in train)  # supervised tokens are a part of those processed
    assert "Validation loss" in open(os.path.join(base_dir, "report", "chat-sft.md")).read()


def test_chat_sft_ctrl_c_then_resume_is_exact(base_dir, sft_run, monkeypatch, another_machine):
    copy_checkpoint(base_dir, "mid_checkpoints", "d1", "split2")
    interrupt_train_loader(monkeypatch, "sft_loader", at_batch=4)  # 2 batches per step: batch 4 in step 2
    assert run_script("scripts.chat_sft", [*SFT, "--model_tag=split2"]) == 0
    folder = os.path.join(base_dir, "chatsft_checkpoints", "split2")
    assert sorted(f for f in os.listdir(folder) if f.startswith("model_")) == ["model_000003.pt"]
    another_machine()
    assert run_script("scripts.chat_sft", [*SFT, "--model_tag=split2", "--resume_from_step=3"]) == 0
    assert_same_run(sft_run, folder, 6)
    assert_saved_choices_made(folder, 3, 6)


def test_chat_eval_scores_every_task_and_reports(base_dir, sft_run, capsys):
    assert run_script("scripts.chat_eval", ["-i", "sft", "-g", "d1", "-x", "3", "-m", "8", "--device_type=cpu"]) == 0
    out = capsys.readouterr().out
    assert "ChatCORE:" in out
    section = open(os.path.join(base_dir, "report", "chat-evaluation-sft.md")).read()
    for task in ("ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee", "ChatCORE"):
        assert f"- {task}: " in section
    assert "| Task | Accuracy |" in section
    assert run_script("scripts.chat_eval", ["-i", "sft", "-a", "ARC-Easy|NoSuchTask"]) == 1


def test_chat_eval_compiles_its_decoding_for_many_completions(base_dir, sft_run, capsys, monkeypatch):
    # on CPU the generative tasks decode eagerly unless they draw decode.COMPILE_MIN_COMPLETIONS completions or
    # more (here 3: GSM8K's 3 problems); once compiled, the next task reuses the step (compiled and eager draw the
    # same tokens: tests/test_engine.py)
    from nanochat import decode
    monkeypatch.setattr(decode, "COMPILE_MIN_COMPLETIONS", 3)
    args = ["-i", "sft", "-g", "d1", "-a", "ARC-Easy|GSM8K|HumanEval", "-m", "8", "--device_type=cpu"]
    assert run_script("scripts.chat_eval", [*args, "-x", "2"]) == 0
    eager = capsys.readouterr().out
    assert "decoding compiled" not in eager and "compiling the decode step" not in eager
    assert run_script("scripts.chat_eval", [*args, "-x", "3"]) == 0
    compiled = capsys.readouterr().out
    assert compiled.count("3 completions to draw per process: decoding compiled") == 1  # at GSM8K, not again
    assert compiled.count("compiling the decode step") == 1
    assert compiled.index("ARC-Easy accuracy") < compiled.index("decoding compiled") < compiled.index("GSM8K accuracy")


def test_dry_runs_and_help(base_dir, capsys):
    """The reference's mixtures and horizons, printed without training; --help lists the settings by group."""
    assert run_script("scripts.mid_train", ["--dry_run", "--device_type=cpu", "--model_tag=d1", "--max_seq_len=32",
                                            "--device_batch_size=2", "--total_batch_size=128"]) == 0
    out = capsys.readouterr().out
    # SmolTalk 20 + MMLU auxiliary_train 12 + GSM8K 12 + identity 6 twice + SimpleSpelling 200K + SpellingBee 80K
    assert "train_conversations: 280056" in out and "grad_accum_steps: 2" in out and "num_iterations: -1" in out
    assert run_script("scripts.chat_sft", ["--dry_run", "--device_type=cpu", "--model_tag=d1", "--source=base"]) == 0
    out = capsys.readouterr().out
    # ARC-Easy 12 + ARC-Challenge 12 + GSM8K 12 + SmolTalk 20 + identity 6 + 300 + 300 = 662 rows, 32 per step
    assert "train_conversations: 662" in out and "num_iterations: 20" in out and "grad_accum_steps: 8" in out
    for script, texts in (("scripts.mid_train", ["Horizon", "Optimisation", "--init_lr_frac=1.0", "--eval_every=150"]),
                          ("scripts.chat_sft", ["--init_lr_frac=0.02", "--target_examples_per_step=32", "--source='mid'"]),
                          ("scripts.chat_eval", ["Tasks", "--task_name=''", "--max_new_tokens=512"])):
        assert run_script(script, ["--help"]) == 0
        out = capsys.readouterr().out
        assert all(text in out for text in texts), (script, out)
