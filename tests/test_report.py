"""The report card: sections logged by stages, assembled in pipeline order with plots and a summary."""

import os
import re
import json
import datetime

import pytest

from nanochat import report as report_module
from nanochat.report import Report, DummyReport, get_report, slugify


@pytest.fixture
def base(base_dir, tmp_path, monkeypatch):
    """conftest's fresh NANOCHAT_BASE_DIR, as rank 0, run from an empty current directory."""
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    cwd = tmp_path / "cwd"  # the copy of report.md goes into the current directory
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return base_dir


def write_training_log(base, tag="d2", steps=10, eval_every=5):
    folder = base / "base_checkpoints" / tag
    folder.mkdir(parents=True)
    lines = []
    for step in range(steps + 1):
        if step % eval_every == 0 or step == steps:
            lines.append({"step": step, "val_bpb": 3.0 - 0.1 * step})
        if step < steps:
            lines.append({"step": step, "loss": 9.0 - 0.5 * step, "lr_mult": 1.0, "dt": 0.1,
                          "tok_per_sec": 1000.0 + step, "mfu": 1.5, "total_time": 0.1 * (step + 1)})
    with open(folder / "log.jsonl", "w") as f:
        f.write("\n".join(json.dumps(line) for line in lines) + "\n")
        f.write('{"step": 99, "loss": ')  # a line cut short by a crash is skipped
    return folder / "log.jsonl"


def test_slugify():
    assert slugify("Base model training") == "base-model-training"
    assert slugify("  CORE: per task / 2025 ") == "core-per-task-2025"


def test_log_writes_one_file_per_section(base):
    report = get_report()
    path = report.log("Tokenizer training", [
        {"vocab_size": 8192, "train_time": 1.23456, "num_chars": 30_000_000, "name": "x"},
        None,  # falsy items are skipped
        "| a | b |\n|---|---|\n| 1 | 2 |",
    ])
    assert path == os.path.join(base, "report", "tokenizer-training.md")
    text = open(path, encoding="utf-8").read()
    assert text.startswith("## Tokenizer training\ntimestamp: ")
    stamp = re.search(r"^timestamp: (.+)$", text, re.MULTILINE).group(1)
    datetime.datetime.strptime(stamp, report_module.TIME_FORMAT)  # parses
    assert "- vocab_size: 8192\n" in text
    assert "- train_time: 1.2346\n" in text
    assert "- num_chars: 30,000,000\n" in text
    assert "| a | b |\n|---|---|\n| 1 | 2 |\n" in text
    assert "None" not in text
    # logging again replaces the section, and no temp files are left behind
    report.log("Tokenizer training", [{"vocab_size": 4096}])
    assert "- vocab_size: 4096" in open(path).read()
    assert os.listdir(os.path.dirname(path)) == ["tokenizer-training.md"]


def test_multiline_values_stay_in_their_list_item(base):
    path = get_report().log("Base model loss", [{"sample 0": "The capital of France is\nParis. 🙂"}])
    assert "- sample 0: The capital of France is\n  Paris. 🙂\n" in open(path, encoding="utf-8").read()


def test_reset_clears_sections_and_writes_header(base):
    report = get_report()
    report.log("Base model training", [{"a": 1}])
    (base / "report.md").write_text("old report")
    report.reset()
    report_dir = base / "report"
    assert sorted(os.listdir(report_dir)) == ["header.md"]
    assert not (base / "report.md").exists()
    header = (report_dir / "header.md").read_text()
    start = re.search(r"^Run started: (.+)$", header, re.MULTILINE).group(1)
    started = datetime.datetime.strptime(start, report_module.TIME_FORMAT)
    assert abs((datetime.datetime.now() - started).total_seconds()) < 120
    for field in ("CPU:", "CPU cores:", "Memory:", "GPUs:", "Python:", "PyTorch:", "git"):
        assert field in header


def test_generate_assembles_sections_in_pipeline_order_with_plots(base):
    report = get_report()
    report.reset()
    # logged out of order on purpose, plus a section the report does not know
    report.log("Base model evaluation", [{"Model": "base_model (step 10)", "CORE metric": 0.0123},
                                         {"hellaswag": 0.01, "arc_easy": 0.02}])
    report.log("Some extra stage", [{"answer": 42}])
    report.log("Tokenizer evaluation", ["| Text Type | Ours Ratio |\n|---|---|\n| news | 4.50 |"])
    report.log("Base model training", [{"model_tag": "d2", "Number of parameters": 1_234_567,
                                        "Number of FLOPs per token": "1.0e+07",
                                        "Number of training tokens": 40960}])
    report.log("Tokenizer training", [{"vocab_size": 8192}])
    report.log("Base model loss", [{"train bpb": 2.5, "val bpb": 2.6}, {"sample 0": "Hello world"}])
    write_training_log(base)
    (base / "base_eval").mkdir()
    (base / "base_eval" / "base_model_000010.csv").write_text(
        "Task      , Accuracy  , Centered  \nhellaswag , 0.260000  , 0.013333  \n"
        "arc_easy  , 0.300000  , 0.066667  \nCORE      ,           , 0.040000  \n")
    report_path = report.generate()

    assert report_path == os.path.join(base, "report.md")
    text = open(report_path, encoding="utf-8").read()
    order = ["# nanochat report card", "## Tokenizer training", "## Tokenizer evaluation",
             "## Base model training", "## Training curves", "## Base model loss",
             "## Base model evaluation", "## Some extra stage", "## Summary"]
    positions = [text.index(title) for title in order]
    assert positions == sorted(positions)
    assert "| news | 4.50 |" in text
    assert "- sample 0: Hello world" in text
    assert "- hellaswag: 0.0100" in text
    # the CORE table comes from base_eval's CSV of that step, inside the evaluation section
    table = text[text.index("## Base model evaluation"):text.index("## Some extra stage")]
    assert "| Task | Accuracy | Centered |" in table
    assert "| hellaswag | 0.260000 | 0.013333 |" in table and "| arc_easy | 0.300000 | 0.066667 |" in table
    assert "| **CORE** | | **0.040000** |" in table
    assert "Total wall time: " in text and "unknown" not in text

    # summary numbers come from the sections and from log.jsonl
    summary = text[text.index("## Summary"):]
    assert "| Parameters | 1,234,567 |" in summary
    assert "| CORE | 0.0123 |" in summary
    assert "| Base model val bpb | 2.6000 |" in summary
    assert "| Min val bpb | 2.0000 |" in summary  # 3.0 - 0.1 * 10
    assert "| Final train loss | 4.5000 |" in summary  # 9.0 - 0.5 * 9
    assert "| Training steps | 10 |" in summary

    # plots: written into <base>/report/, referenced relative to each report.md
    for image in ("train_loss.png", "val_bpb.png"):
        png = base / "report" / image
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"](report/{image})" in text
    cwd_text = open("report.md", encoding="utf-8").read()
    for image in ("train_loss.png", "val_bpb.png"):
        assert f"](report_files/{image})" in cwd_text
        assert open(os.path.join("report_files", image), "rb").read()[:4] == b"\x89PNG"
    assert cwd_text.replace("report_files/", "report/") == text


def test_training_log_keeps_last_line_per_step(tmp_path):
    path = tmp_path / "log.jsonl"
    rows = [{"step": 0, "loss": 5.0}, {"step": 1, "loss": 4.0}, {"step": 1, "val_bpb": 2.0},
            {"step": 1, "loss": 3.5}]  # step 1 logged again after a resume
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    train, evals = report_module.read_training_log(str(path))
    assert [(r["step"], r["loss"]) for r in train] == [(0, 5.0), (1, 3.5)]
    assert [(r["step"], r["val_bpb"]) for r in evals] == [(1, 2.0)]


def test_generate_without_reset_or_training_log(base, capsys):
    report = get_report()
    report.log("Tokenizer training", [{"vocab_size": 8192}])
    report.generate()
    text = (base / "report.md").read_text()
    assert "## Tokenizer training" in text
    assert "No training log" in text
    assert "Total wall time: unknown" in text
    out = capsys.readouterr().out
    assert "report reset" in out and "'Base model training'" in out  # says what is missing
    assert not os.path.exists("report_files")


def test_dummy_report_on_other_ranks(base, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    report = get_report()
    assert isinstance(report, DummyReport)
    report.reset()
    report.log("Base model training", [{"a": 1}])
    report.generate()
    assert not (base / "report").exists()
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert isinstance(get_report(), Report)


def test_chat_phases_table_and_curves(base):
    """The BASE/MID/SFT table in the summary, read by key from each stage's section, and the mid/SFT curves."""
    report = get_report()
    report.reset()
    report.log("Base model evaluation", [{"CORE metric": 0.2215}])
    chat_results = {"mid": [0.35, 0.28, 0.31, 0.02, 0.06, 0.9], "sft": [0.38, 0.3, 0.32, 0.05, 0.07, 0.95]}
    for phase, values in chat_results.items():
        accuracies = dict(zip(["ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee"], values))
        report.log(f"Chat evaluation {phase}", [{"source": phase, "task_name": ""}, accuracies,
                                                {"ChatCORE": 0.1 + len(phase) / 100}])
    phases = (("Midtraining", "mid_checkpoints", "val_bpb"), ("Chat SFT", "chatsft_checkpoints", "val_loss"))
    for section, folder, eval_key in phases:
        (base / folder / "d2").mkdir(parents=True)
        with open(base / folder / "d2" / "log.jsonl", "w") as f:
            for step in range(4):
                f.write(json.dumps({"step": step, "loss": 2.0 - 0.1 * step, "dt": 0.1}) + "\n")
            f.write(json.dumps({"step": 4, eval_key: 1.5}) + "\n")
        report.log(section, [{"Model tag": "d2"}])
    text = open(report.generate(), encoding="utf-8").read()
    summary = text[text.index("## Summary"):]
    assert "| Metric | BASE | MID | SFT |" in summary
    assert "| CORE | 0.2215 | - | - |" in summary
    assert "| ARC-Easy | - | 0.3500 | 0.3800 |" in summary
    assert "| HumanEval | - | 0.0600 | 0.0700 |" in summary
    assert "| ChatCORE | - | 0.1300 | 0.1300 |" in summary
    assert "SpellingBee" not in summary  # in ChatCORE, not in the reference's table
    for image in ("mid_train_loss.png", "mid_val_bpb.png", "sft_train_loss.png", "sft_val_loss.png"):
        assert (base / "report" / image).exists() and f"](report/{image})" in text
        assert os.path.exists(os.path.join("report_files", image))  # copied beside ./report.md
    assert text.index("## Midtraining") < text.index("mid_train_loss.png") < text.index("## Chat evaluation mid") \
        < text.index("## Chat SFT") < text.index("sft_train_loss.png") < text.index("## Chat evaluation sft")


def test_rl_column_and_curves(base):
    """With RL, the table gains an RL column (GSM8K only) and the RL section its reward, pass@1 and pass@k plots."""
    report = get_report()
    report.reset()
    report.log("Base model evaluation", [{"CORE metric": 0.2215}])
    report.log("Chat evaluation sft", [{"source": "sft"}, {"GSM8K": 0.05, "ARC-Easy": 0.38}])
    folder = base / "chatrl_checkpoints" / "d2"
    folder.mkdir(parents=True)
    with open(folder / "log.jsonl", "w") as f:
        f.write(json.dumps({"step": 0, "pass@1": 0.05, "pass@2": 0.08}) + "\n")
        for step in range(4):
            f.write(json.dumps({"step": step, "reward": 0.1 * step, "loss": -0.01, "dt": 1.0}) + "\n")
        f.write(json.dumps({"step": 4, "pass@1": 0.09, "pass@2": 0.14}) + "\n")
    report.log("Chat RL", [{"Model tag": "d2"}])
    report.log("Chat evaluation rl", [{"source": "rl"}, {"GSM8K": 0.0875}])
    text = open(report.generate(), encoding="utf-8").read()
    summary = text[text.index("## Summary"):]
    assert "| Metric | BASE | MID | SFT | RL |" in summary
    assert "| GSM8K | - | - | 0.0500 | 0.0875 |" in summary
    assert "| ARC-Easy | - | - | 0.3800 | - |" in summary
    for image in ("rl_train_reward.png", "rl_pass_at_1.png", "rl_pass_at_k.png"):
        assert (base / "report" / image).read_bytes()[:4] == b"\x89PNG" and f"](report/{image})" in text
    assert text.index("## Chat evaluation sft") < text.index("## Chat RL") < text.index("rl_train_reward.png") \
        < text.index("## Chat evaluation rl")
