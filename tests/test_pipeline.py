"""
End to end: runs/runcpu.sh at toy size, fed by a local HTTP server on 127.0.0.1 (a generated corpus
and a generated CORE eval bundle). Every stage must leave its output and report.md must hold every
section; a second run must skip the finished stages.
"""

import os
import json
import random
import zipfile
import subprocess
import sys

import pytest

from conftest import write_text_parquet
from toy_task_data import write_task_data

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_TRAIN_SHARDS = 3  # shards 0..2 train, shard 3 validation
STEPS = 4

# toy sizes for every knob of runcpu.sh
TOY_SIZES = {
    "NANOCHAT_RUNCPU_SHARDS": str(NUM_TRAIN_SHARDS),
    "NANOCHAT_RUNCPU_TOK_MAX_CHARS": "200000",
    "NANOCHAT_RUNCPU_VOCAB_SIZE": "512",
    "NANOCHAT_RUNCPU_DEPTH": "1",
    "NANOCHAT_RUNCPU_SEQ_LEN": "64",
    "NANOCHAT_RUNCPU_DEVICE_BATCH": "2",
    "NANOCHAT_RUNCPU_TOTAL_BATCH": "128",
    "NANOCHAT_RUNCPU_STEPS": str(STEPS),
    "NANOCHAT_RUNCPU_EVAL_EVERY": "2",
    "NANOCHAT_RUNCPU_EVAL_TOKENS": "256",
    "NANOCHAT_RUNCPU_CORE_MAX_PER_TASK": "4",
    "NANOCHAT_RUNCPU_MID_STEPS": "3",
    "NANOCHAT_RUNCPU_SFT_STEPS": "2",
    "NANOCHAT_RUNCPU_SFT_EXAMPLES": "4",
    "NANOCHAT_RUNCPU_CHAT_PROBLEMS": "2",
    "NANOCHAT_RUNCPU_CHAT_MAX_TOKENS": "4",
    "NANOCHAT_RUNCPU_RL_STEPS": "2",
    "NANOCHAT_RUNCPU_RL_MAX_TOKENS": "4",
}
SECTIONS = ["Tokenizer training", "Tokenizer evaluation", "Base model training", "Training curves",
            "Base model loss", "Base model evaluation", "Midtraining", "Chat evaluation mid", "Chat SFT",
            "Chat evaluation sft", "Chat RL", "Chat evaluation rl", "Summary"]


def make_words(rng, n):
    syllables = ["ka", "lo", "mi", "ne", "su", "ta", "ri", "po", "ve", "da", "shi", "qua", "ex", "on", "al"]
    return ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(n)]


def make_document(rng, words):
    sentences = []
    for _ in range(rng.randint(3, 12)):
        sentence = " ".join(rng.choice(words) for _ in range(rng.randint(4, 14)))
        sentences.append(sentence.capitalize() + rng.choice([".", ".", "!", "?"]) + f" {rng.randint(0, 999)}")
    return " ".join(sentences)


def write_corpus(folder, rng, words):
    for index in range(NUM_TRAIN_SHARDS + 1):
        docs = [make_document(rng, words) for _ in range(256)]
        write_text_parquet(os.path.join(folder, f"shard_{index:05d}.parquet"), docs, row_group_size=128)


def write_eval_bundle(path, rng, words):
    """A bundle in the DCLM CORE layout with one task of each type."""
    def phrase(n):
        return " ".join(rng.choice(words) for _ in range(n))
    tasks = {
        "toy_choice": ("multiple_choice", 2, "\nAnswer: ",
                       [{"query": f"Question: {phrase(6)}?", "choices": [phrase(2), phrase(3), phrase(1)],
                         "gold": rng.randint(0, 2)} for _ in range(8)]),
        "toy_schema": ("schema", 0, " ",
                       [{"context_options": [phrase(5), phrase(5)], "continuation": phrase(3),
                         "gold": rng.randint(0, 1)} for _ in range(8)]),
        "toy_lm": ("language_modeling", 1, " ",
                   [{"context": phrase(7), "continuation": phrase(2)} for _ in range(8)]),
    }
    core_yaml = ["icl_tasks:"]
    meta_csv = ["Eval Task,Task Category,Task Type,#shots,#datapoints,Random baseline,Centered Metric?,Description"]
    with zipfile.ZipFile(path, "w") as zf:
        for label, (task_type, shots, delimiter, rows) in tasks.items():
            core_yaml += [f"- label: {label}", f"  dataset_uri: toy/{label}.jsonl", "  num_fewshot:",
                          f"  - {shots}", f"  icl_task_type: {task_type}",
                          f"  continuation_delimiter: {json.dumps(delimiter)}"]
            baseline = {"multiple_choice": 33.3, "schema": 50, "language_modeling": 0}[task_type]
            meta_csv.append(f"{label},toy,{task_type},{shots},{len(rows)},{baseline},,generated")
            zf.writestr(f"eval_bundle/eval_data/toy/{label}.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        zf.writestr("eval_bundle/core.yaml", "\n".join(core_yaml) + "\n")
        zf.writestr("eval_bundle/eval_meta_data.csv", "\n".join(meta_csv) + "\n")


@pytest.fixture
def served(file_server):
    """Corpus, eval bundle and chat task data, generated and served on 127.0.0.1 (conftest's file server)."""
    rng = random.Random(0)
    words = make_words(rng, 300)
    write_corpus(os.path.join(file_server.root, "corpus"), rng, words)
    write_eval_bundle(os.path.join(file_server.root, "eval_bundle.zip"), rng, words)
    write_task_data(os.path.join(file_server.root, "tasks"), rng)
    return file_server.url


def run_runcpu(env, cwd):
    result = subprocess.run(["bash", os.path.join(REPO_ROOT, "runs", "runcpu.sh")], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"runcpu.sh failed (exit {result.returncode}):\n{output[-6000:]}"
    return output


@pytest.mark.slow
def test_runcpu_end_to_end_at_toy_size(served, tmp_path):
    base = tmp_path / "base"
    workdir = tmp_path / "work"  # where the user runs the script: report.md is copied here
    workdir.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env.update(TOY_SIZES)
    env.update({
        "NANOCHAT_BASE_DIR": str(base),
        "NANOCHAT_DATA_URL": f"{served}/corpus",
        "NANOCHAT_DATA_MAX_SHARD": str(NUM_TRAIN_SHARDS),
        "NANOCHAT_EVAL_BUNDLE_URL": f"{served}/eval_bundle.zip",
        "NANOCHAT_TASKS_URL": f"{served}/tasks",
        "NANOCHAT_WORDS_URL": f"{served}/tasks/words_alpha.txt",
        "NANOCHAT_IDENTITY_URL": f"{served}/tasks/identity_conversations.jsonl",
        "WANDB_MODE": "disabled",
        # no network in tests: anything that is not the local server fails fast
        "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
        "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9",
        "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
        "TIKTOKEN_CACHE_DIR": str(tmp_path / "tiktoken_cache"),
        "HF_HUB_OFFLINE": "1",
    })
    output = run_runcpu(env, workdir)

    # every stage left its output
    tag_dir = base / "base_checkpoints" / f"d{TOY_SIZES['NANOCHAT_RUNCPU_DEPTH']}"
    expected = [base / "base_data" / f"shard_{i:05d}.parquet" for i in range(NUM_TRAIN_SHARDS + 1)]
    expected += [base / "tokenizer" / "tokenizer.pkl", base / "tokenizer" / "token_bytes.pt",
                 tag_dir / f"model_{STEPS:06d}.pt", tag_dir / f"meta_{STEPS:06d}.json", tag_dir / "log.jsonl",
                 base / "base_eval" / f"base_model_{STEPS:06d}.csv", base / "eval_bundle" / "core.yaml",
                 base / "report" / "train_loss.png", base / "report" / "val_bpb.png", base / "report.md",
                 workdir / "report.md", workdir / "report_files" / "train_loss.png",
                 base / "mid_checkpoints" / tag_dir.name / "model_000003.pt",
                 base / "chatsft_checkpoints" / tag_dir.name / "model_000002.pt",
                 base / "chatrl_checkpoints" / tag_dir.name / "model_000002.pt",
                 base / "report" / "mid_train_loss.png", base / "report" / "sft_train_loss.png",
                 base / "report" / "rl_train_reward.png", base / "report" / "rl_pass_at_k.png"]
    missing = [str(p.relative_to(tmp_path)) for p in expected if not p.exists()]
    assert not missing, f"missing outputs: {missing}"
    with open(tag_dir / "log.jsonl") as f:
        records = [json.loads(line) for line in f if line.strip()]
    assert [r["step"] for r in records if "loss" in r] == list(range(STEPS))
    assert any("val_bpb" in r for r in records)
    core_csv = (base / "base_eval" / f"base_model_{STEPS:06d}.csv").read_text()
    assert all(task in core_csv for task in ("toy_choice", "toy_schema", "toy_lm", "CORE"))

    # report.md: every section, in pipeline order, with the plots referenced
    text = (base / "report.md").read_text(encoding="utf-8")
    positions = [text.find(f"## {name}") for name in SECTIONS]
    assert -1 not in positions, f"sections missing from report.md: {[n for n, p in zip(SECTIONS, positions) if p < 0]}"
    assert positions == sorted(positions)
    assert "](report/train_loss.png)" in text and "](report/val_bpb.png)" in text
    assert "| CORE |" in text
    assert "| Metric | BASE | MID | SFT | RL |" in text and "| ChatCORE | - |" in text
    assert "Total wall time: unknown" not in text
    assert "](report_files/train_loss.png)" in (workdir / "report.md").read_text(encoding="utf-8")

    # it ends by printing how to talk to the model; the terminal one answers
    tag = f"d{TOY_SIZES['NANOCHAT_RUNCPU_DEPTH']}"
    commands = [line.strip() for line in output.splitlines() if "python -m scripts.chat_" in line]
    assert [c.split("#")[0].split() for c in commands] == [
        [f"NANOCHAT_BASE_DIR={base}", "python", "-m", f"scripts.chat_{kind}", "-i", "sft", "-g", tag]
        for kind in ("cli", "web")]  # the pipeline's last model: SFT
    assert "http://localhost:8000/" in commands[1]
    chat_cli = [sys.executable, "-m", "scripts.chat_cli", "-i", "sft", "-g", tag, "-p", "Hello", "-m", "4"]
    answer = subprocess.run(chat_cli,
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert answer.returncode == 0 and answer.stdout.endswith("\n"), answer.stderr  # an answer (maybe empty: a toy model)

    # a second run skips every finished stage and leaves the checkpoint alone
    checkpoint_mtime = os.path.getmtime(tag_dir / f"model_{STEPS:06d}.pt")
    output = run_runcpu(env, workdir)
    for name in ("tokenizer", "base model training", "base model evaluation (CORE)", "midtraining",
                 "chat evaluation (mid)", "SFT", "chat evaluation (sft)", "RL", "chat evaluation (rl)"):
        assert f"[skip] {name}:" in output
    assert os.path.getmtime(tag_dir / f"model_{STEPS:06d}.pt") == checkpoint_mtime
    assert "## Base model evaluation" in (workdir / "report.md").read_text(encoding="utf-8")


def test_run_scripts_parse():
    for script in ("speedrun.sh", "runs/runcpu.sh", "runs/run1000.sh", "runs/pipeline.sh"):
        result = subprocess.run(["bash", "-n", os.path.join(REPO_ROOT, script)], capture_output=True, text=True)
        assert result.returncode == 0, f"{script}: {result.stderr}"
