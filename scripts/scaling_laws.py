"""
Scaling laws: for a compute budget, how large a model and how many tokens? An iso-FLOP sweep trains a grid
of budgets x depths with base_train, each run for exactly its budget, and fits the compute-optimal size
and token count (nanochat/scaling.py says how). A miniseries then trains a series of depths at the
tokens:params ratio found, and compares CORE and val bpb against training FLOPs.

    python -m scripts.scaling_laws --budgets=1e18,1e19 --depths=10,12,14 --nproc_per_node=8
    python -m scripts.scaling_laws --miniseries --depths=12,16,20,24      # at the ratio the sweep found
    bash runs/scaling_laws.sh cpu                                         # presets: cpu, gpu, ...
    python -m scripts.scaling_laws --shard=0/4   # on machine 0 of 4 (...--shard=3/4 on the last one), then
    python -m scripts.scaling_laws --train=false # once all are done: collect every finished point and analyse

Each point is one base_train run with its own model tag, sl_<label>_c<budget>_d<depth> (miniseries:
sl_<label>_mini_d<depth>), under <base>/base_checkpoints. A run stopped for any reason resumes from its
last checkpoint the next time (Ctrl-C or SIGTERM saves one; --save_every_minutes bounds what a kill loses);
finished points are skipped. Results, read from each run's log.jsonl and checkpoint meta only, go to
<base>/scaling_laws/<label>/: points/<tag>.json (one per finished point), results.csv, fit.json and the
plots (miniseries: miniseries.csv, miniseries.png), logs/<tag>.log (each run's output), and a section
of the report.
"""

import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

from nanochat.checkpoint_manager import list_steps, read_meta
from nanochat.common import atomic_write, format_seconds, get_base_dir
from nanochat.configurator import configure
from nanochat.report import get_report, IMAGE_DIR, read_training_log
from nanochat.training import saved_machine_choices
from nanochat import scaling

# -----------------------------------------------------------------------------
# Settings. Each can be overridden on the command line (--name=value); --help prints this block.

# Sweep: the grid of compute budgets x depths (upstream nanochat's 8-GPU grid by default)
label = "sweep"  # names the results folder <base>/scaling_laws/<label> and the runs' model tags
budgets = "1e18,2.15e18,4.64e18,1e19"  # training FLOPs of each point, comma-separated (base_train's FLOP count)
depths = "10,12,14,16,18,20"  # depths trained at every budget (with --miniseries: the series' depths)
params_for_fit = "no_embedding"  # N of the fit: no_embedding (what base_train's FLOPs count) or all
shard = "0/1"  # i/n: run every n-th point from the i-th (n machines, a job array); the analysis merges all done
train = True  # false: train nothing, only collect the finished points and analyse them
# Miniseries: a series of depths at one tokens:params ratio
miniseries = False  # train --depths at --ratio instead of the grid; then CORE and val bpb against FLOPs
ratio = -1.0  # tokens per parameter (N as in --params_for_fit); -1 = the ratio the sweep of this --label found
# Launch: how each base_train run starts
nproc_per_node = 1  # processes per run; more than 1 starts each run with torchrun (one per GPU)
run = "dummy"  # wandb: each run is named <run>_<tag> ("dummy" = no wandb)
# base_train settings given to every run ("" = base_train's own choice)
device_type = ""  # cuda|cpu|mps
dtype = "auto"  # auto|bfloat16|float32
compile = "auto"  # auto|true|false
max_seq_len = 2048  # context length
device_batch_size = 32  # sequences per forward pass per process
total_batch_size = 524288  # tokens per optimisation step
eval_tokens = 20*524288  # validation tokens of the final val bpb (the same first tokens of the val split for all)
core_metric = True  # CORE at the end of each run
core_metric_max_per_task = 500  # examples per CORE task (-1 = all)
save_every_minutes = 30.0  # checkpoint this often: a killed run resumes from there
train_args = ""  # any other base_train settings, e.g. "--matrix_lr=0.03 --warmup_ratio=0.05"
user_config = configure(globals(), __file__)
# -----------------------------------------------------------------------------

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ONLY_AT_END = 10**9  # an eval/CORE interval no run reaches: base_train then evaluates at the start and end only
# settings that may change between the sessions of a point, or between points of one label, without changing results
HARMLESS = {"run", "compile", "save_every_minutes", "resume_from_step"}
POINT_SETTINGS = {"depth", "target_flops", "num_iterations", "model_tag"}  # what tells the points of a label apart
kind = "miniseries" if miniseries else "sweep"

# -----------------------------------------------------------------------------
# The points: depth, horizon, tag and the exact base_train settings of each

def parse_list(text, cast, name):
    try:
        values = [cast(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"error: --{name} must be comma-separated numbers, got {text!r}")
    if not values or any(v <= 0 for v in values) or len(set(values)) != len(values):
        raise SystemExit(f"error: --{name} needs distinct positive values, got {text!r}")
    return sorted(values)

depth_list = parse_list(depths, int, "depths")
budget_list = parse_list(budgets, float, "budgets") if not miniseries else []
try:
    shard_index, shard_count = (int(v) for v in shard.split("/"))
    assert 0 <= shard_index < shard_count
except (ValueError, AssertionError):
    raise SystemExit(f"error: --shard must be i/n with 0 <= i < n, e.g. 0/4, got {shard!r}")
if params_for_fit not in scaling.PARAM_COUNTS:
    raise SystemExit(f"error: --params_for_fit must be one of {'|'.join(scaling.PARAM_COUNTS)}, got {params_for_fit!r}")
param_key = scaling.PARAM_COUNTS[params_for_fit]

results_dir = os.path.join(get_base_dir(), "scaling_laws", label)
points_dir = os.path.join(results_dir, "points" if kind == "sweep" else "miniseries_points")
logs_dir = os.path.join(results_dir, "logs")
checkpoints_root = os.path.join(get_base_dir(), "base_checkpoints")

shared_settings = {  # what every run gets; a label's points must all have been trained with the same
    "device_type": device_type or None, "dtype": dtype, "compile": compile, "max_seq_len": max_seq_len,
    "device_batch_size": device_batch_size, "total_batch_size": total_batch_size, "eval_tokens": eval_tokens,
    "eval_every": ONLY_AT_END, "core_metric_every": ONLY_AT_END if core_metric else -1,
    "core_metric_max_per_task": core_metric_max_per_task, "sample_every": -1,
    "save_every_minutes": save_every_minutes, "write_report": False,
}
extra_args = shlex.split(train_args)
if any(not a.startswith("--") for a in extra_args):
    raise SystemExit(f"error: --train_args takes base_train settings written --name=value, got {train_args!r}")

# The model of each depth (this also refuses depths that base_train cannot build, before any training)
if train:
    from nanochat.tokenizer import get_tokenizer
    try:
        vocab_size = get_tokenizer().get_vocab_size()
    except FileNotFoundError as e:
        raise SystemExit(f"error: {e}")
    try:
        counts = {d: scaling.model_counts(d, vocab_size, max_seq_len) for d in depth_list}
    except ValueError as e:
        raise SystemExit(f"error: --depths: {e}")

def horizon_ratio():
    """The miniseries' tokens per parameter: --ratio, else the one the sweep of this label fit."""
    if ratio > 0:
        return ratio, "--ratio"
    fit_path = os.path.join(results_dir, "fit.json")
    if not os.path.exists(fit_path):
        raise SystemExit(f"error: the miniseries needs a tokens:params ratio: give --ratio, or run the sweep of "
                         f"--label={label} first (its fit goes to {fit_path})")
    with open(fit_path) as f:
        fit = json.load(f)
    if fit.get("ratio") is None or fit.get("params_for_fit") != params_for_fit:
        raise SystemExit(f"error: {fit_path} has no ratio for --params_for_fit={params_for_fit} (see its notes); "
                         "give --ratio")
    return fit["ratio"], f"the sweep's fit ({fit_path})"

points = []  # in a fixed order, so that every shard splits them alike
if train and miniseries:
    series_ratio, ratio_source = horizon_ratio()
    print(f"Miniseries at {series_ratio:.2f} tokens per parameter ({params_for_fit}), from {ratio_source}")
    for d in depth_list:
        n = counts[d][0] if params_for_fit == "all" else counts[d][1]
        steps = max(1, round(series_ratio * n / total_batch_size))
        points.append(dict(depth=d, ratio=round(series_ratio, 4), tag=f"sl_{label}_mini_d{d}",
                           horizon={"num_iterations": steps}))
elif train:
    for c in budget_list:
        for d in depth_list:
            points.append(dict(depth=d, budget=c, tag=f"sl_{label}_c{scaling.budget_tag(c)}_d{d}",
                               horizon={"target_flops": c}))
for p in points:
    p["settings"] = {"depth": p["depth"], **p["horizon"], "model_tag": p["tag"], **shared_settings,
                     **({"run": f"{run}_{p['tag']}"} if run != "dummy" else {})}

def check_settings(where, saved, wanted, skip=HARMLESS):
    """Refuse to mix points trained with other settings into one label's results."""
    for name, value in wanted.items():
        if name not in skip and value is not None and name in saved and saved[name] != value:
            raise SystemExit(f"error: {where} was trained with --{name}={saved[name]!r}, not {value!r} as the other "
                             f"points. One label holds one set of settings: use another --label, or remove "
                             f"{results_dir} and the runs' checkpoints to start over.")

# -----------------------------------------------------------------------------
# A point's state, from its checkpoint folder: finished (with its result row), stopped at a step, or new

def point_state(point):
    """("done", row) | ("resume", step) | ("new", None). Reads only log.jsonl and the checkpoint meta files."""
    folder = os.path.join(checkpoints_root, point["tag"])
    steps = list_steps(folder) if os.path.isdir(folder) else []
    if not steps:
        return "new", None
    meta, _ = read_meta(folder, steps[-1])
    check_settings(f"{point['tag']} (step {steps[-1]})", meta["user_config"], point["settings"])
    final = meta["step"] == meta["num_iterations"]
    log_path = os.path.join(folder, "log.jsonl")
    train_records, evals = read_training_log(log_path) if os.path.exists(log_path) else ([], [])
    cores = read_training_log(log_path, "core_metric")[1] if os.path.exists(log_path) else []
    val_bpb = next((r["val_bpb"] for r in evals if r["step"] == meta["step"]), None)
    core = next((r for r in cores if r["step"] == meta["step"]), None)
    if not final or val_bpb is None or (core_metric and core is None):
        return "resume", steps[-1]  # stopped before the end, or during the final evaluation
    warm = [r for r in train_records if r["step"] > 10] or train_records  # base_train's warm-up rule
    batch = meta["user_config"]["total_batch_size"]
    tokens = batch * meta["num_iterations"]
    row = {
        "depth": point["depth"], "width": meta["model_config"]["n_embd"],
        "params": meta["num_params"], "params_no_embedding": meta["num_params_no_embedding"],
        "flops_per_token": meta["flops_per_token"], "steps": meta["num_iterations"], "tokens": tokens,
        "flops": meta["flops_per_token"] * tokens, "val_bpb": val_bpb,
        "core": core["core_metric"] if core else None, "core_tasks": core["core_tasks"] if core else None,
        "wall_time_s": round(meta["loop_state"]["wall_time"], 1),
        "tok_per_sec": round(batch * len(warm) / sum(r["dt"] for r in warm), 1) if warm else None,
        "precision": saved_machine_choices(meta)["autocast"],  # (dtype=auto measures per machine)
        "tag": point["tag"], "settings": meta["user_config"],
    }
    row.update({"budget": point["budget"]} if "budget" in point else {"ratio": point["ratio"]})
    return "done", row

def write_point(row):
    atomic_write(os.path.join(points_dir, f"{row['tag']}.json"), lambda f: json.dump(row, f, indent=1), mode="w")

def read_points():
    """Every finished point of this label and kind (any shard's, any earlier grid's), checked for one settings set."""
    rows = []
    if os.path.isdir(points_dir):
        for name in sorted(os.listdir(points_dir)):
            if name.endswith(".json"):
                with open(os.path.join(points_dir, name)) as f:
                    rows.append(json.load(f))
    for row in rows[1:]:
        check_settings(f"{row['tag']} (in {points_dir})", row["settings"], rows[0]["settings"],
                       HARMLESS | POINT_SETTINGS)
        if row.get("ratio") != rows[0].get("ratio"):
            raise SystemExit(f"error: {points_dir} holds miniseries points at tokens:params {row['ratio']} and "
                             f"{rows[0]['ratio']}: use one --label per ratio")
    return rows

# -----------------------------------------------------------------------------
# Training: this shard's points, one base_train run each

def run_point(point, resume_step):
    """Run base_train for the point (streaming its output to the terminal and logs/<tag>.log); True if it finished."""
    launcher = [sys.executable, "-m", "scripts.base_train"] if nproc_per_node == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc_per_node}",
         "-m", "scripts.base_train"]
    args = [f"--{k}={v}" for k, v in point["settings"].items() if v is not None] + extra_args
    if resume_step is not None:
        args.append(f"--resume_from_step={resume_step}")
    os.makedirs(logs_dir, exist_ok=True)
    stop = {"requested": False}
    with open(os.path.join(logs_dir, f"{point['tag']}.log"), "a", encoding="utf-8") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')}: {shlex.join(launcher + args)}\n")
        proc = subprocess.Popen(launcher + args, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))

        def pass_on(signum, frame):
            # Ctrl-C reaches the run from the terminal too, SIGTERM from a scheduler may reach only us: either
            # way the run saves its step and exits, and a signal repeated within seconds counts once there.
            stop["requested"] = True
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

        handlers = {s: signal.signal(s, pass_on) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            for line in proc.stdout:
                sys.stdout.write(line)
                sys.stdout.flush()  # promptly, also into a pipe or a file
                log.write(line)
            code = proc.wait()
        finally:
            for s, handler in handlers.items():
                signal.signal(s, handler)
    if stop["requested"]:
        raise SystemExit(f"Stopped during {point['tag']}: its last step is saved. Run the same command again to "
                         "resume it (finished points are skipped).")
    if code != 0:
        raise SystemExit(f"error: base_train failed for {point['tag']} (exit code {code}); its output is in "
                         f"{os.path.join(logs_dir, point['tag'] + '.log')}. Finished points are kept: fix the cause "
                         "and run the same command again.")

if train:
    finished = read_points()
    if finished:  # a label's points are all trained alike
        check_settings(f"{finished[0]['tag']} (in {points_dir})", finished[0]["settings"], shared_settings)
        if miniseries and finished[0]["ratio"] != points[0]["ratio"]:
            raise SystemExit(f"error: {points_dir} holds a miniseries at tokens:params {finished[0]['ratio']}, "
                             f"not {points[0]['ratio']}: use another --label for another ratio")
    mine = points[shard_index::shard_count]
    print(f"{kind}: {len(points)} points, {len(mine)} in shard {shard_index}/{shard_count}; results in {results_dir}")
    print(f"{'tag':<28} {'params':>12} {'no emb.':>12} {'FLOPs/token':>12} {'steps':>8} {'FLOPs':>10}")
    planned = {}
    for p in mine:
        params, params_no_embedding, flops_per_token = counts[p["depth"]]
        steps = p["horizon"].get("num_iterations") or round(p["budget"] / (flops_per_token * total_batch_size))
        if steps < 1:
            raise SystemExit(f"error: {p['tag']}: {p['budget']:.3g} FLOPs are less than one step of "
                             f"{total_batch_size:,} tokens at {flops_per_token:.3g} FLOPs per token: raise the "
                             "budget, or lower --total_batch_size or the depth")
        planned[p["tag"]] = flops_per_token * total_batch_size * steps
        print(f"{p['tag']:<28} {params:>12,} {params_no_embedding:>12,} {flops_per_token:>12.3e} {steps:>8,} "
              f"{planned[p['tag']]:>10.3g}")
    todo = []
    for p in mine:
        state, detail = point_state(p)
        if state == "done":
            write_point(detail)  # (again: the same row)
        else:
            todo.append((p, detail))
    print(f"{len(mine) - len(todo)} finished already, {len(todo)} to train")
    start, flops_done = time.time(), 0.0
    flops_todo = sum(planned[p["tag"]] for p, _ in todo)
    for i, (p, resume_step) in enumerate(todo):
        what = f"resuming from step {resume_step}" if resume_step is not None else "new"
        eta = f", ETA {format_seconds((time.time() - start) / flops_done * (flops_todo - flops_done))}" \
            if flops_done else ""
        print(f"\n[{i + 1}/{len(todo)}] {p['tag']} ({what}){eta}", flush=True)
        run_point(p, resume_step)
        state, detail = point_state(p)
        if state != "done":
            raise SystemExit(f"Stopped during {p['tag']} (at step {detail}): run the same command again to resume it.")
        write_point(detail)
        flops_done += planned[p["tag"]]
    print(f"\nShard {shard_index}/{shard_count}: trained {len(todo)} points in {format_seconds(time.time() - start)}")

# -----------------------------------------------------------------------------
# Analysis: whatever is finished in the results folder (every shard's points)

rows = sorted(read_points(), key=lambda r: (r.get("budget", 0), r["depth"]))
if not rows:
    raise SystemExit(f"No finished points in {points_dir} yet: nothing to analyse.")
param_label = "all parameters" if params_for_fit == "all" else "parameters without the token embedding"
for r in rows:
    r["tokens_per_param"] = round(r["tokens"] / r[param_key], 3)
columns = ["budget" if kind == "sweep" else "ratio", "depth", "width", "params", "params_no_embedding",
           "flops_per_token", "steps", "tokens", "flops", "tokens_per_param", "val_bpb", "core", "wall_time_s",
           "tok_per_sec", "precision", "tag"]
csv_name = "results.csv" if kind == "sweep" else "miniseries.csv"
csv_text = ",".join(columns) + "\n" + "".join(
    ",".join("" if r.get(c) is None else str(r[c]) for c in columns) + "\n" for r in rows)
atomic_write(os.path.join(results_dir, csv_name), lambda f: f.write(csv_text), mode="w")

def markdown_table(headers, lines):
    return "\n".join(["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)] +
                     ["| " + " | ".join(str(c) for c in line) + " |" for line in lines])

def fmt(value, spec):
    return "-" if value is None else format(value, spec)

point_table = markdown_table(
    ["budget" if kind == "sweep" else "ratio", "depth", "N (no emb.)", "N (all)", "tokens", "tokens/N", "val bpb",
     "CORE", "wall time", "tok/s"],
    [[fmt(r.get("budget", r.get("ratio")), ".3g"), r["depth"], f"{r['params_no_embedding']:,}", f"{r['params']:,}",
      f"{r['tokens']:,}", fmt(r["tokens_per_param"], ".2f"), fmt(r["val_bpb"], ".4f"), fmt(r["core"], ".4f"),
      format_seconds(r["wall_time_s"]), fmt(r["tok_per_sec"], ",.0f")] for r in rows])
report = get_report()
images = []  # (file name in the results folder, title)
unshown = POINT_SETTINGS | HARMLESS | {"eval_every", "sample_every", "write_report"}  # the same for any sweep
shown = {k: v for k, v in rows[0]["settings"].items() if k in shared_settings and k not in unshown}
settings_line = (f"{len(rows)} finished points in `{results_dir}`, each a base_train run with "
                 + " ".join(f"--{k}={v}" for k, v in shown.items()) + ".")

if kind == "sweep":
    fit = scaling.fit_sweep(rows, param_key)
    fit_json = {
        "params_for_fit": params_for_fit, "a": fit.a, "b": fit.b, "ratio": fit.ratio, "ratio_6n": fit.ratio_6n,
        "spread": fit.spread, "refits": fit.refits, "notes": fit.notes,
        "budgets": [{"budget": f.budget, "status": f.status, "n_opt": f.n_opt, "tokens_opt": f.tokens_opt,
                     "ratio": f.ratio, "bpb_opt": f.bpb_opt, "best_measured_bpb": min(f.bpb)} for f in fit.budgets],
    }
    atomic_write(os.path.join(results_dir, "fit.json"), lambda f: json.dump(fit_json, f, indent=1), mode="w")
    scaling.plot_isoflop(fit, os.path.join(results_dir, "isoflop.png"), param_label)
    scaling.plot_optimal(fit, os.path.join(results_dir, "optimal.png"), param_label)
    scaling.plot_frontier(fit, os.path.join(results_dir, "frontier.png"))
    images = [("isoflop.png", "iso-FLOP curves"), ("optimal.png", "N* and D* against C"),
              ("frontier.png", "loss frontier")]
    attention = [1 - 6 * r["params_no_embedding"] / r["flops_per_token"] for r in rows]  # 12 L d T of the FLOPs
    optimum_table = markdown_table(
        ["budget C", "optimum", "N*", "D* (tokens)", "D*/N*", "fitted bpb", "best measured bpb"],
        [[f"{f.budget:.3g}", f.status, fmt(f.n_opt, ",.0f"), fmt(f.tokens_opt, ",.0f"), fmt(f.ratio, ".2f"),
          fmt(f.bpb_opt, ".4f"), f"{min(f.bpb):.4f}"] for f in fit.budgets])

    def with_spread(name, value, spec):
        if value is None:
            return "not fit"
        low_high = fit.spread.get(name)
        return f"{value:{spec}}" + (f" (leave-one-depth-out: {low_high[0]:{spec}} .. {low_high[1]:{spec}})"
                                    if low_high else "")
    summary = [
        f"- N* ~ C^a: a = {with_spread('a', fit.a, '.3f')}",
        f"- D* ~ C^b: b = {with_spread('b', fit.b, '.3f')}",
        f"- optimal tokens per parameter D*/N*: {with_spread('ratio', fit.ratio, '.2f')}"
        + (f"; {fit.ratio_6n:.2f} with the 6N convention (D* = C/6N*)" if fit.ratio_6n else ""),
        f"- from {len(fit.used)} of {len(fit.budgets)} budgets (those with an interior optimum); "
        f"N = {param_label}; D* = C / FLOPs per token of N* in base_train's count: 6 per parameter without the "
        f"token embedding, plus attention (here {min(attention):.0%} to {max(attention):.0%} of it)",
        *[f"- note: {note}" for note in fit.notes],
    ]
    section = "Scaling laws"
    body = [settings_line, "", point_table, "", "Compute-optimal points (parabola of val bpb in ln N per budget):",
            "", optimum_table, "", *summary]
else:
    ratios = sorted({r["ratio"] for r in rows})
    comparable = all(r["core_tasks"] == scaling.CORE_TASKS for r in rows if r["core"] is not None) and \
        any(r["core"] is not None for r in rows)
    scaling.plot_miniseries(rows, os.path.join(results_dir, "miniseries.png"), show_references=comparable)
    images = [("miniseries.png", "miniseries")]
    tasks = sorted({r["core_tasks"] for r in rows if r["core_tasks"]})
    references = (f"Dashed lines: published GPT-2 CORE scores, {scaling.CORE_REFERENCE_SOURCE}: "
                  + ", ".join(f"{name} {score}" for name, score in scaling.CORE_REFERENCES) + ". Not our results."
                  if comparable else
                  f"No published reference lines: our CORE covers {'/'.join(map(str, tasks)) or 'no'} of the "
                  f"{scaling.CORE_TASKS} tasks the published scores use (the eval bundle here lacks the others).")
    section = "Miniseries"
    body = [settings_line, f"Tokens per parameter ({params_for_fit}): {', '.join(f'{x:g}' for x in ratios)}.", "",
            point_table, "", references]

print("\n".join(["", f"## {section}", *body]))
for name, title in images:
    shutil.copyfile(os.path.join(results_dir, name), os.path.join(report.report_dir, f"scaling_{name}"))
    body += ["", f"![{title}]({IMAGE_DIR}/scaling_{name})"]
report.log(section=section, data="\n".join(body))  # one block: its blank lines separate the tables
print(f"\nWrote {os.path.join(results_dir, csv_name)}, the plots next to it, and the report section '{section}'")
