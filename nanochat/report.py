"""
The report card of a run.

Each stage of the pipeline logs one markdown section into <base>/report/ (one file per section).
`python -m nanochat.report reset` starts a run: it clears that folder and writes a header with the
system info and the start time. `python -m nanochat.report generate` stitches the sections together,
in pipeline order, with plots of the training curves and a summary, into <base>/report.md and a copy
in the current directory.
"""

import os
import re
import json
import glob
import shutil
import argparse
import datetime
import platform
import subprocess

from nanochat import hardware
from nanochat.common import get_base_dir, get_dist_info, atomic_write

TIME_FORMAT = "%Y-%m-%d %H:%M:%S"
START_PREFIX = "Run started:"

# Sections in pipeline order (the names the stages log under). Sections with other names still make
# it into the report, after these, in the order they were written.
PIPELINE_SECTIONS = [
    "Tokenizer training",
    "Tokenizer evaluation",
    "Base model training",
    "Base model loss",
    "Base model evaluation",
    "Midtraining",
    "Chat evaluation mid",
    "Chat SFT",
    "Chat evaluation sft",
    "Chat RL",
    "Chat evaluation rl",
]
IMAGE_DIR = "@@IMAGE_DIR@@"  # replaced by the image folder relative to each copy of report.md
PLOTS = [("train_loss.png", "loss", "train loss"), ("val_bpb.png", "val_bpb", "val bpb")]
# the chat phases: (section, checkpoint folder, file prefix, (training key, label), (evaluation key, label)) of
# what their log.jsonl holds
CHAT_PHASES = [("Midtraining", "mid_checkpoints", "mid", ("loss", "train loss"),
                ("val_bpb", "val bpb (validation mixture)")),
               ("Chat SFT", "chatsft_checkpoints", "sft", ("loss", "train loss"),
                ("val_loss", "val loss (SmolTalk test)")),
               ("Chat RL", "chatrl_checkpoints", "rl", ("reward", "mean reward (GSM8K train)"),
                ("pass@1", "pass@1 (GSM8K test)"))]
CHAT_METRICS = ["ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "ChatCORE"]  # the reference's table


def slugify(name):
    """'Base model training' -> 'base-model-training' (the section's file name)."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def now_str():
    return datetime.datetime.now().strftime(TIME_FORMAT)


def format_value(value):
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10000:
        return f"{value:,}"
    # keep multi-line values (samples) inside their list item by indenting the continuation lines
    return str(value).replace("\n", "\n  ")


def render_items(data):
    """Markdown for a section's data: dicts become '- key: value' lines, strings go in verbatim."""
    if isinstance(data, (str, dict)):
        data = [data]
    lines = []
    for item in data:
        if not item:
            continue  # None, {}, "" say nothing
        if isinstance(item, str):
            lines.append(item.rstrip("\n"))
        elif isinstance(item, dict):
            lines.extend(f"- {key}: {format_value(value)}" for key, value in item.items())
        else:
            raise TypeError(f"report data items must be dicts or strings, got {type(item).__name__}")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# System info for the header

def run_command(args):
    """stdout of a short read-only command, or None if it fails (no git, not a repo, ...)."""
    try:
        result = subprocess.run(args, capture_output=True, text=True, timeout=5,
                                cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        return result.stdout.strip() if result.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def system_info_lines():
    import psutil
    import torch

    lines = ["### Code"]
    commit = run_command(["git", "rev-parse", "--short", "HEAD"])
    if commit is None:
        lines.append("- git: not a git checkout")
    else:
        dirty = bool(run_command(["git", "status", "--porcelain", "--untracked-files=no"]))
        lines.append(f"- git commit: {commit}{' (dirty)' if dirty else ''}")
        lines.append(f"- git branch: {run_command(['git', 'rev-parse', '--abbrev-ref', 'HEAD']) or 'unknown'}")
    lines.append("")
    lines.append("### Hardware")
    native_bf16 = [f for f in ("avx512_bf16", "amx_bf16") if f in hardware.cpu_flags()]
    lines.append(f"- CPU: {hardware.cpu_model()}" + (f" ({', '.join(native_bf16)})" if native_bf16 else ""))
    lines.append(f"- CPU cores: {psutil.cpu_count(logical=False)} physical, {psutil.cpu_count(logical=True)} logical")
    lines.append(f"- Memory: {psutil.virtual_memory().total / 2**30:.1f} GiB")
    if torch.cuda.is_available():
        props = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())]
        names = sorted({p.name for p in props})
        lines.append(f"- GPUs: {len(props)}x {', '.join(names)}, {props[0].total_memory / 2**30:.1f} GiB each")
        lines.append(f"- CUDA: {torch.version.cuda}")
    else:
        lines.append("- GPUs: none")
    lines.append("")
    lines.append("### Software")
    lines.append(f"- Python: {platform.python_version()}")
    lines.append(f"- PyTorch: {torch.__version__}")
    lines.append(f"- Platform: {platform.platform()}")
    return lines


# -----------------------------------------------------------------------------
# Reading back what the stages wrote

def parse_section(text):
    """(name, timestamp or None, {key: value} of its '- key: value' lines) of a section file."""
    name_match = re.search(r"^## (.+)$", text, re.MULTILINE)
    time_match = re.search(r"^timestamp: (.+)$", text, re.MULTILINE)
    stamp = None
    if time_match:
        try:
            stamp = datetime.datetime.strptime(time_match.group(1).strip(), TIME_FORMAT)
        except ValueError:
            pass
    items = dict(re.findall(r"^- ([^:\n]+): (.*)$", text, re.MULTILINE))
    return (name_match.group(1).strip() if name_match else ""), stamp, items


def read_training_log(path, eval_key="val_bpb"):
    """Training steps and eval points (lines with eval_key) from log.jsonl; a step's last line wins (resumed runs)."""
    train, evals = {}, {}
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
            if not isinstance(record, dict) or "step" not in record:
                continue
            if "loss" in record:
                train[record["step"]] = record
            if eval_key in record:
                evals[record["step"]] = record
    return [train[s] for s in sorted(train)], [evals[s] for s in sorted(evals)]


def find_training_log(base_dir, model_tag=None):
    """<base>/base_checkpoints/<model_tag>/log.jsonl, or the newest log.jsonl when the tag is unknown."""
    if model_tag:
        path = os.path.join(base_dir, "base_checkpoints", model_tag, "log.jsonl")
        if os.path.exists(path):
            return path
    paths = glob.glob(os.path.join(base_dir, "base_checkpoints", "*", "log.jsonl"))
    return max(paths, key=os.path.getmtime) if paths else None


def save_plot(path, steps, values, ylabel, title):
    import matplotlib
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, values, marker="o" if len(steps) <= 50 else None, markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)


def training_curves(report_dir, log_path):
    """Writes the PNG plots into report_dir; returns (markdown with IMAGE_DIR for the image folder, summary dict)."""
    train, evals = read_training_log(log_path)
    lines = ["## Training curves", f"From `{log_path}`.", ""]
    summary = {}
    for file_name, key, label in PLOTS:
        points = [r for r in (train if key == "loss" else evals) if isinstance(r.get(key), (int, float))]
        if not points:
            lines.append(f"- no {label} points logged")
            continue
        save_plot(os.path.join(report_dir, file_name), [r["step"] for r in points], [r[key] for r in points],
                  label, f"{label} vs step")
        lines.append(f"![{label}]({IMAGE_DIR}/{file_name})")
        lines.append("")
    if train:
        summary["Training steps"] = train[-1]["step"] + 1  # steps count from 0
        summary["Final train loss"] = f"{train[-1]['loss']:.4f}"
        rates = sorted(r["tok_per_sec"] for r in train if isinstance(r.get("tok_per_sec"), (int, float)))
        if rates:
            summary["Median tok/s"] = f"{rates[len(rates) // 2]:,.0f}"
        mfus = sorted(r["mfu"] for r in train if isinstance(r.get("mfu"), (int, float)))
        if mfus:
            summary["Median MFU %"] = f"{mfus[len(mfus) // 2]:.2f}"
        if isinstance(train[-1].get("total_time"), (int, float)):
            summary["Training time"] = f"{train[-1]['total_time'] / 60:.2f}m"
    if evals:
        summary["Min val bpb"] = f"{min(r['val_bpb'] for r in evals):.4f}"
        summary["Final val bpb"] = f"{evals[-1]['val_bpb']:.4f}"
    return "\n".join(lines), summary


def core_table(base_dir, eval_items):
    """Markdown table of <base>/base_eval/base_model_<step>.csv (accuracy and centered score per task)."""
    match = re.search(r"step (\d+)", eval_items.get("Model", ""))
    path = os.path.join(base_dir, "base_eval", f"base_model_{int(match.group(1)):06d}.csv") if match else None
    if path is None or not os.path.exists(path):
        paths = glob.glob(os.path.join(base_dir, "base_eval", "base_model_*.csv"))
        if not paths:
            return ""
        path = max(paths, key=os.path.getmtime)
    with open(path, encoding="utf-8") as f:
        rows = [[cell.strip() for cell in line.split(",")] for line in f if line.strip()]
    lines = [f"CORE per task (`{os.path.relpath(path, base_dir)}`):", "",
             "| Task | Accuracy | Centered |", "|---|---|---|"]
    for row in rows[1:]:  # rows[0] is the header
        if len(row) == 3:
            task, accuracy, centered = row
            bold = task == "CORE"  # the CORE line has no accuracy
            lines.append(f"| **{task}** | | **{centered}** |" if bold else f"| {task} | {accuracy} | {centered} |")
    return "\n".join(lines)


def chat_phase_curves(report_dir, base_dir, section, items):
    """Markdown with the training and evaluation plots of a chat phase (mid, SFT, RL), from its log.jsonl."""
    _, folder, prefix, (train_key, train_label), (eval_key, eval_label) = next(p for p in CHAT_PHASES
                                                                               if p[0] == section)
    tag = items.get("Model tag")
    path = os.path.join(base_dir, folder, tag or "", "log.jsonl")
    if not tag or not os.path.exists(path):
        paths = glob.glob(os.path.join(base_dir, folder, "*", "log.jsonl"))
        if not paths:
            return ""
        path = max(paths, key=os.path.getmtime)
    train, evals = read_training_log(path, eval_key)
    lines = [f"{section} curves (`{os.path.relpath(path, base_dir)}`):", ""]
    for file_name, points, key, label in ((f"{prefix}_train_{train_key}.png", train, train_key, train_label),
                                          (f"{prefix}_{eval_key.replace('@', '_at_')}.png", evals, eval_key,
                                           eval_label)):
        points = [r for r in points if isinstance(r.get(key), (int, float))]
        if points:
            save_plot(os.path.join(report_dir, file_name), [r["step"] for r in points], [r[key] for r in points],
                      label, f"{section}: {label} vs step")
            lines += [f"![{section} {label}]({IMAGE_DIR}/{file_name})", ""]
    if evals and "pass@1" in evals[-1]:  # pass@k against k, at the first and the last evaluation
        file_name = f"{prefix}_pass_at_k.png"
        save_pass_at_k_plot(os.path.join(report_dir, file_name), evals[0], evals[-1], section)
        lines += [f"![{section} pass@k]({IMAGE_DIR}/{file_name})", ""]
    return "\n".join(lines)


def save_pass_at_k_plot(path, first, last, section):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    for record, style in ((first, "o--"), (last, "o-")):
        ks = sorted(int(key[5:]) for key in record if key.startswith("pass@"))
        ax.plot(ks, [record[f"pass@{k}"] for k in ks], style, markersize=3, label=f"step {record['step']}")
    ax.set_xlabel("k (samples per problem)")
    ax.set_ylabel("pass@k")
    ax.set_title(f"{section}: pass@k (GSM8K test)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)


def phase_table(items_of):
    """The reference's table: CORE of the base model, then the chat metrics of the midtrained, SFT and RL models
    (the RL column only when RL ran: it is evaluated on GSM8K)."""
    columns = {"BASE": items_of.get("base-model-evaluation", {}), "MID": items_of.get("chat-evaluation-mid", {}),
               "SFT": items_of.get("chat-evaluation-sft", {}), "RL": items_of.get("chat-evaluation-rl", {})}
    if not columns["MID"] and not columns["SFT"]:
        return ""
    if not columns["RL"]:
        del columns["RL"]
    lines = ["| Metric | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for metric in ["CORE", *CHAT_METRICS]:
        cells = [column.get("CORE metric") if name == "BASE" else None for name, column in columns.items()]
        if metric != "CORE":
            cells = [None if name == "BASE" else column.get(metric) for name, column in columns.items()]
        lines.append(f"| {metric} | " + " | ".join(cell if cell is not None else "-" for cell in cells) + " |")
    return "\n".join(lines)


# -----------------------------------------------------------------------------

class Report:
    """Sections logged by the stages, assembled into report.md by generate()."""

    def __init__(self, report_dir):
        os.makedirs(report_dir, exist_ok=True)
        self.report_dir = report_dir

    def log(self, section, data):
        """Write (or overwrite) the section's file: a title, a timestamp, then the data."""
        text = f"## {section}\ntimestamp: {now_str()}\n\n{render_items(data)}\n\n"
        path = os.path.join(self.report_dir, f"{slugify(section)}.md")
        atomic_write(path, lambda f: f.write(text.encode("utf-8")))
        return path

    def reset(self):
        """Start a new run: clear the report folder and write the header with the start time."""
        for name in os.listdir(self.report_dir):
            path = os.path.join(self.report_dir, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        stale = os.path.join(os.path.dirname(self.report_dir), "report.md")
        if os.path.exists(stale):
            os.remove(stale)
        header = "\n".join(["# nanochat report card", "", f"{START_PREFIX} {now_str()}", "",
                            *system_info_lines(), ""])
        atomic_write(os.path.join(self.report_dir, "header.md"), lambda f: f.write((header + "\n").encode("utf-8")))
        print(f"Report reset: header written to {os.path.join(self.report_dir, 'header.md')}")

    def read_sections(self):
        """[(name, timestamp, items, text)] in pipeline order, then any other sections by time."""
        sections = []
        for path in glob.glob(os.path.join(self.report_dir, "*.md")):
            if os.path.basename(path) == "header.md":
                continue
            with open(path, encoding="utf-8") as f:
                text = f.read()
            name, stamp, items = parse_section(text)
            sections.append((name, stamp, items, text))
        known = {slugify(name): i for i, name in enumerate(PIPELINE_SECTIONS)}
        def order(section):
            name, stamp = section[0], section[1] or datetime.datetime.max
            return (known.get(slugify(name), len(known)), stamp, name)
        return sorted(sections, key=order)

    def generate(self):
        """Write <base>/report.md (images in report/) and ./report.md (images copied to ./report_files/)."""
        base_dir = os.path.dirname(os.path.abspath(self.report_dir))
        header_path = os.path.join(self.report_dir, "header.md")
        start = None
        if os.path.exists(header_path):
            with open(header_path, encoding="utf-8") as f:
                header = f.read()
            match = re.search(rf"^{START_PREFIX} (.+)$", header, re.MULTILINE)
            start = datetime.datetime.strptime(match.group(1).strip(), TIME_FORMAT) if match else None
        else:
            print(f"Warning: {header_path} is missing (run `python -m nanochat.report reset` at the start "
                  "of a run); the total wall time will be unknown")
            header = "\n".join(["# nanochat report card", "", *system_info_lines(), ""]) + "\n"

        sections = self.read_sections()
        found = {slugify(s[0]) for s in sections}
        for name in PIPELINE_SECTIONS:
            if slugify(name) not in found:
                print(f"Note: no '{name}' section in {self.report_dir} (that stage did not run or did not finish)")
        items_of = {slugify(s[0]): s[2] for s in sections}
        training = items_of.get("base-model-training", {})
        log_path = find_training_log(base_dir, training.get("model_tag"))
        if log_path:
            curves, curve_summary = training_curves(self.report_dir, log_path)
        else:
            curves, curve_summary = "## Training curves\nNo training log (base_checkpoints/*/log.jsonl) found.", {}

        # Headline numbers: from the sections, by the keys their stages log them under, and the training log
        summary = {
            "Parameters": training.get("Number of parameters"),
            "FLOPs per token": training.get("Number of FLOPs per token"),
            "Training tokens": training.get("Number of training tokens"),
            **curve_summary,
            "Base model val bpb": items_of.get("base-model-loss", {}).get("val bpb"),
            "CORE": items_of.get("base-model-evaluation", {}).get("CORE metric"),
        }
        summary_lines = ["## Summary", "", "| Metric | Value |", "|---|---|"]
        summary_lines += [f"| {k} | {v} |" for k, v in summary.items() if v is not None]
        phases = phase_table(items_of)
        if phases:
            summary_lines += ["", phases]
        # The run ends with its last section (so regenerating the report later does not stretch it).
        now = datetime.datetime.now()
        end = max([s[1] for s in sections if s[1] is not None], default=now)
        wall = f"{(end - start).total_seconds() / 60:.1f} minutes" if start else "unknown"
        summary_lines += ["", f"Total wall time: {wall} (from `report reset` to the last stage's section)",
                          f"Report generated: {now.strftime(TIME_FORMAT)}", ""]

        # Sections in pipeline order, the curves right after training.
        parts = [header.rstrip("\n") + "\n"]
        curves_placed = False
        for name, _, items, text in sections:
            parts.append(text.rstrip("\n") + "\n")
            if slugify(name) == "base-model-evaluation":
                table = core_table(base_dir, items)
                if table:
                    parts.append(table + "\n")
            if name in [p[0] for p in CHAT_PHASES]:
                phase_curves = chat_phase_curves(self.report_dir, base_dir, name, items)
                if phase_curves:
                    parts.append(phase_curves + "\n")
            if slugify(name) == "base-model-training":
                parts.append(curves + "\n")
                curves_placed = True
        if not curves_placed:
            parts.append(curves + "\n")
        parts.append("\n".join(summary_lines))
        markdown = "\n".join(parts)

        report_path = os.path.join(base_dir, "report.md")
        report_folder = os.path.basename(self.report_dir)
        atomic_write(report_path, lambda f: f.write(markdown.replace(IMAGE_DIR, report_folder).encode("utf-8")))
        print(f"Report written to {report_path}")
        if os.path.abspath(os.getcwd()) != base_dir:
            # The copy in the current directory takes its images along in report_files/.
            images = sorted(os.path.basename(p) for p in glob.glob(os.path.join(self.report_dir, "*.png")))
            if images:
                os.makedirs("report_files", exist_ok=True)
                for image in images:
                    shutil.copyfile(os.path.join(self.report_dir, image), os.path.join("report_files", image))
            atomic_write("report.md", lambda f: f.write(markdown.replace(IMAGE_DIR, "report_files").encode("utf-8")))
            print(f"Copied to {os.path.abspath('report.md')}" + (" (plots in report_files/)" if images else ""))
        return report_path


class DummyReport:
    """What ranks other than 0 get: the same calls, doing nothing."""

    def log(self, *args, **kwargs):
        pass

    def reset(self, *args, **kwargs):
        pass

    def generate(self, *args, **kwargs):
        pass


def get_report():
    """Only rank 0 writes the report."""
    _, rank, _, _ = get_dist_info()
    if rank != 0:
        return DummyReport()
    return Report(os.path.join(get_base_dir(), "report"))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="The run's report card in <base>/report/ and report.md.")
    parser.add_argument("command", choices=["reset", "generate"],
                        help="reset: clear the report and note the start time; generate: write report.md")
    args = parser.parse_args()
    report = get_report()
    if args.command == "reset":
        report.reset()
    else:
        report.generate()
