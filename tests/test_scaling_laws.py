"""
scripts/scaling_laws.py at toy size (depths 1-3, 64-token sequences, a 300-token vocabulary, a tiny CORE
bundle, generated data in a temporary NANOCHAT_BASE_DIR): a 2 budgets x 3 depths sweep run as two shards
that the analysis merges, a re-run that trains nothing, a point stopped by SIGTERM that resumes to the
uninterrupted result, the miniseries, and the settings it refuses.
"""

import contextlib
import csv
import io
import json
import os
import runpy
import subprocess
import sys
import time

import pytest

from conftest import environment, make_pretraining_base_dir
from test_core_eval import make_bundle
from nanochat import scaling
from nanochat.checkpoint_manager import list_steps

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 300
BATCH = 256  # tokens per step: 4 sequences of 64
TOY = ["--device_type=cpu", "--dtype=float32", "--compile=false", "--max_seq_len=64", "--device_batch_size=4",
       f"--total_batch_size={BATCH}", "--eval_tokens=512", "--core_metric_max_per_task=-1",
       "--save_every_minutes=-1"]
BUDGETS, DEPTHS = [2e9, 6e9], [1, 2, 3]  # 17/3/1 and 51/8/3 steps
GRID = ["--label=grid", "--budgets=2e9,6e9", "--depths=1,2,3"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The base dir, also in this process's environment (the sweep runs here, its base_train runs inherit it)."""
    base = str(tmp_path_factory.mktemp("scaling_base"))
    make_pretraining_base_dir(base, VOCAB)
    make_bundle(base)  # <base>/eval_bundle: CORE over 3 tiny tasks
    with environment(NANOCHAT_BASE_DIR=base, NANOCHAT_DATA_MAX_SHARD="3"):
        yield base


def sweep_command(*args):
    return [sys.executable, "-m", "scripts.scaling_laws", *TOY, *args]


def sweep(base, *args):
    """Run the sweep in this process (as `python -m scripts.scaling_laws TOY ARGS`): (exit code, its output)."""
    saved_argv, out = sys.argv, io.StringIO()
    sys.argv = sweep_command(*args)[2:]
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_module("scripts.scaling_laws", run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
        out.write(f"{e.code}\n" if not isinstance(e.code, int) else "")
    finally:
        sys.argv = saved_argv
    return code, out.getvalue()


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def tag(label, budget, depth):
    return f"sl_{label}_c{scaling.budget_tag(budget)}_d{depth}"


@pytest.fixture(scope="module")
def grid(base):
    """The grid, run as shard 0 of 2 and then shard 1 of 2; returns the results folder and shard 0's CSV."""
    results = os.path.join(base, "scaling_laws", "grid")
    code, out = sweep(base, *GRID, "--shard=0/2")
    assert code == 0, out
    first_half = read_csv(os.path.join(results, "results.csv"))
    code, out = sweep(base, *GRID, "--shard=1/2")
    assert code == 0, out
    return results, first_half


def test_shards_split_the_grid_and_the_analysis_merges_them(base, grid):
    results, first_half = grid
    points = [(c, d) for c in BUDGETS for d in DEPTHS]
    assert [(float(r["budget"]), int(r["depth"])) for r in first_half] == points[0::2]  # every other point
    rows = read_csv(os.path.join(results, "results.csv"))
    assert [(float(r["budget"]), int(r["depth"])) for r in rows] == points
    for r in rows:
        budget, depth = float(r["budget"]), int(r["depth"])
        params, no_embedding, flops_per_token = scaling.model_counts(depth, VOCAB, 64)
        assert (int(r["params"]), int(r["params_no_embedding"]), int(r["flops_per_token"])) == \
            (params, no_embedding, flops_per_token)
        assert int(r["width"]) == 64 * depth and r["tag"] == tag("grid", budget, depth)
        steps = int(r["steps"])
        assert steps == round(budget / (flops_per_token * BATCH)) and int(r["tokens"]) == steps * BATCH
        assert int(r["flops"]) == flops_per_token * steps * BATCH
        assert float(r["tokens_per_param"]) == pytest.approx(steps * BATCH / no_embedding, abs=1e-3)
        # val bpb and CORE as base_train logged them at its last step
        with open(os.path.join(base, "base_checkpoints", r["tag"], "log.jsonl")) as f:
            log = [json.loads(line) for line in f]
        assert float(r["val_bpb"]) == [x["val_bpb"] for x in log if "val_bpb" in x and x["step"] == steps][0]
        core = [x for x in log if "core_metric" in x]
        assert [x["step"] for x in core] == [steps] and core[0]["core_tasks"] == 3
        assert float(r["core"]) == core[0]["core_metric"]
        assert float(r["wall_time_s"]) > 0 and float(r["tok_per_sec"]) > 0
    # the bigger budget does better at every depth
    by_point = {(float(r["budget"]), int(r["depth"])): float(r["val_bpb"]) for r in rows}
    assert all(by_point[(6e9, d)] < by_point[(2e9, d)] for d in DEPTHS)
    fit = json.load(open(os.path.join(results, "fit.json")))
    assert [b["budget"] for b in fit["budgets"]] == BUDGETS and fit["params_for_fit"] == "no_embedding"
    for b in fit["budgets"]:
        best = min(DEPTHS, key=lambda d: by_point[(b["budget"], d)])
        assert b["best_measured_bpb"] == by_point[(b["budget"], best)]
        # the optimum counts as found only when the best depth is inside the grid
        assert (b["status"] == "interior") == (best == 2 and b["n_opt"] is not None)
        if b["status"] != "interior":
            assert any(note.startswith(f"budget {b['budget']:.3g}:") for note in fit["notes"])
    for name in ("isoflop.png", "optimal.png", "frontier.png"):
        with open(os.path.join(results, name), "rb") as f:
            assert f.read(4) == b"\x89PNG"
        assert os.path.exists(os.path.join(base, "report", f"scaling_{name}"))
    section = open(os.path.join(base, "report", "scaling-laws.md")).read()
    assert section.startswith("## Scaling laws") and "@@IMAGE_DIR@@/scaling_isoflop.png" in section
    assert "--max_seq_len=64" in section
    assert all(f"| {b['budget']:.3g} | {b['status']} |" in section for b in fit["budgets"])  # the optima's table
    assert not os.path.exists(os.path.join(base, "report", "base-model-training.md"))  # the runs keep out of it


def test_a_rerun_trains_nothing(base, grid):
    results, _ = grid
    folders = [os.path.join(base, "base_checkpoints", tag("grid", c, d)) for c in BUDGETS for d in DEPTHS]
    mtimes = lambda: {os.path.join(f, name): os.stat(os.path.join(f, name)).st_mtime_ns
                      for f in folders for name in os.listdir(f)}
    before = mtimes()
    csv_before = open(os.path.join(results, "results.csv")).read()
    code, out = sweep(base, *GRID)
    assert code == 0, out
    assert "6 finished already, 0 to train" in out
    assert mtimes() == before
    assert open(os.path.join(results, "results.csv")).read() == csv_before


def test_a_stopped_point_resumes_to_the_uninterrupted_result(base, grid):
    """SIGTERM to the sweep (as a scheduler sends it): it passes it on, the run saves its step; the next
    sweep resumes it from there, and the result equals the grid's uninterrupted run of the same point."""
    point = tag("resume", 6e9, 1)
    folder = os.path.join(base, "base_checkpoints", point)
    args = ["--label=resume", "--budgets=6e9", "--depths=1"]
    proc = subprocess.Popen(sweep_command(*args), cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)  # a process of its own, to receive the signal
    log_path = os.path.join(folder, "log.jsonl")
    deadline = time.time() + 300
    while not (os.path.exists(log_path) and '"val_bpb"' in open(log_path).read()):  # step 0's evaluation, then training
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() is not None else ""
        time.sleep(0.01)
    proc.terminate()
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 1 and f"Stopped during {point}: its last step is saved" in out, out
    steps = list_steps(folder)
    assert len(steps) == 1 and 0 < steps[0] < 51, steps
    assert not os.path.exists(os.path.join(base, "scaling_laws", "resume", "points", f"{point}.json"))

    code, out = sweep(base, *args)
    assert code == 0, out
    assert f"[1/1] {point} (resuming from step {steps[0]})" in out
    assert f"--resume_from_step={steps[0]}" in open(os.path.join(base, "scaling_laws", "resume", "logs",
                                                                  f"{point}.log")).read()
    with open(log_path) as f:
        trained = [json.loads(line)["step"] for line in f if '"loss"' in line]
    assert trained == list(range(51))  # every step once: the stretch after the checkpoint was redone, not repeated
    resumed = read_csv(os.path.join(base, "scaling_laws", "resume", "results.csv"))
    uninterrupted = [r for r in read_csv(os.path.join(grid[0], "results.csv")) if r["tag"] == tag("grid", 6e9, 1)]
    assert resumed[0]["val_bpb"] == uninterrupted[0]["val_bpb"] and resumed[0]["core"] == uninterrupted[0]["core"]
    fit = json.load(open(os.path.join(base, "scaling_laws", "resume", "fit.json")))
    assert fit["a"] is None and fit["budgets"][0]["status"] == "too few points"  # one point: said, not fit


def test_miniseries_trains_depths_at_one_ratio(base, grid):
    code, out = sweep(base, "--label=grid", "--miniseries", "--ratio=0.02", "--depths=1,2")
    assert code == 0, out
    rows = read_csv(os.path.join(grid[0], "miniseries.csv"))
    assert [int(r["depth"]) for r in rows] == [1, 2]
    for r in rows:
        assert int(r["steps"]) == round(0.02 * int(r["params_no_embedding"]) / BATCH)
        assert float(r["ratio"]) == 0.02 and r["core"] != "" and float(r["val_bpb"]) > 0
    assert float(rows[1]["flops"]) > float(rows[0]["flops"])
    with open(os.path.join(grid[0], "miniseries.png"), "rb") as f:
        assert f.read(4) == b"\x89PNG"
    section = open(os.path.join(base, "report", "miniseries.md")).read()
    assert section.startswith("## Miniseries") and "@@IMAGE_DIR@@/scaling_miniseries.png" in section
    # a CORE of 3 tasks is not comparable with the published 22-task scores: no reference lines, and it says why
    assert "No published reference lines: our CORE covers 3 of the 22 tasks" in section
    # another ratio in the same folder would mix two series
    code, out = sweep(base, "--label=grid", "--miniseries", "--ratio=0.04", "--depths=1,2")
    assert code == 1 and "holds a miniseries at tokens:params 0.02, not 0.04" in out, out


@pytest.mark.parametrize("args, message", [
    (["--max_seq_len=32"], "was trained with --max_seq_len=64, not 32 as the other points"),
    (["--depths=4,5"], "--depths: depth 5 gives width 320, which its 3 heads do not divide: use depth 4 or 6"),
    (["--shard=2/2"], "--shard must be i/n with 0 <= i < n"),
    (["--budgets=1e3"], "1e+03 FLOPs are less than one step"),
    (["--miniseries", "--label=nothing"], "the miniseries needs a tokens:params ratio: give --ratio, or run the "
                                          "sweep of --label=nothing first"),
])
def test_settings_it_refuses(base, grid, args, message):
    code, out = sweep(base, *GRID, *args)
    assert code == 1 and message in out, out
