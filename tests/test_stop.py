"""
Stopping a training run: a launcher's echo of Ctrl-C is not a second Ctrl-C, a real second one stops at
once, CORE evaluation ends between tasks when a stop is requested, and a loss of inf/nan stops every rank
before the weights change.
"""

import os
import re
import signal
import subprocess
import sys

from nanochat.core_eval import evaluate_core
from test_core_eval import BigramModel, CharTokenizer, make_bundle

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_an_echoed_signal_is_ignored_and_a_later_one_stops_at_once():
    script = """
import os, signal, time
from nanochat.training import StopRequest
stop = StopRequest()
stop.ECHO_SECONDS = 0.5
os.kill(os.getpid(), signal.SIGINT)   # Ctrl-C from the terminal...
os.kill(os.getpid(), signal.SIGTERM)  # ...and torchrun passing it on, at once
print("requested", stop.requested, flush=True)
time.sleep(0.8)
os.kill(os.getpid(), signal.SIGINT)   # asked again, later: stop now
time.sleep(5)
print("still alive", flush=True)
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
                            env=dict(os.environ, PYTHONPATH=REPO_ROOT))
    assert result.stdout.splitlines() == ["requested True"]
    assert result.returncode == -signal.SIGINT


def test_core_evaluation_stops_between_tasks(tmp_path):
    bundle = make_bundle(str(tmp_path))
    model = BigramModel([(" ", "c"), ("p", "q"), ("d", " "), ("h", " "), ("c", "d")])
    asked = []
    should_stop = lambda: asked.append(1) or len(asked) > 2  # noqa: E731
    assert evaluate_core(model, CharTokenizer(), "cpu", bundle, should_stop=should_stop) is None
    assert len(asked) == 3  # asked before each task; the third answer was yes
    out = evaluate_core(model, CharTokenizer(), "cpu", bundle, should_stop=lambda: False)
    assert out["core_metric"] > 0


# ---------------------------------------------------------------------------------------------
# SIGTERM to torchrun in the middle of CORE evaluation: a complete checkpoint that resumes exactly

import json  # noqa: E402
import random  # noqa: E402
import time  # noqa: E402
import zipfile  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from test_base_train import TOY  # noqa: E402
from conftest import make_documents  # noqa: E402


def write_slow_bundle(path, rng, num_tasks=8, rows=48):
    """A CORE bundle of several 3-shot multiple-choice tasks: enough work to stop in the middle of."""
    nouns = ["cat", "dog", "river", "moon", "bread", "letter", "garden", "teacher", "bird", "hill"]
    core_yaml, meta_csv = ["icl_tasks:"], ["Eval Task,Task Category,Task Type,#shots,#datapoints,Random baseline,x,y"]
    with zipfile.ZipFile(path, "w") as zf:
        for t in range(num_tasks):
            label = f"toy_{t}"
            data = [{"query": f"The {rng.choice(nouns)} sees the {rng.choice(nouns)}. Which?",
                     "choices": [rng.choice(nouns) for _ in range(3)], "gold": rng.randint(0, 2)} for _ in range(rows)]
            zf.writestr(f"eval_bundle/eval_data/toy/{label}.jsonl", "".join(json.dumps(r) + "\n" for r in data))
            core_yaml += [f"- label: {label}", f"  dataset_uri: toy/{label}.jsonl", "  num_fewshot: [3]",
                          "  icl_task_type: multiple_choice", "  continuation_delimiter: ' '"]
            meta_csv.append(f"{label},toy,multiple_choice,3,{rows},33.3,,")
        zf.writestr("eval_bundle/core.yaml", "\n".join(core_yaml) + "\n")
        zf.writestr("eval_bundle/eval_meta_data.csv", "\n".join(meta_csv) + "\n")


@pytest.fixture(scope="module")
def stop_base_dir(tmp_path_factory):
    from nanochat.tokenizer import RustBPETokenizer
    import pyarrow as pa
    import pyarrow.parquet as pq
    base = tmp_path_factory.mktemp("stop_base")
    rng = random.Random(0)
    (base / "base_data").mkdir()
    for shard in range(4):
        pq.write_table(pa.table({"text": make_documents(rng, 64)}), base / "base_data" / f"shard_{shard:05d}.parquet",
                       row_group_size=8)
    RustBPETokenizer.train_from_iterator(iter(make_documents(rng, 200)), 300).save(str(base / "tokenizer"))
    write_slow_bundle(base / "bundle.zip", rng)
    return base


def torchrun_env(base):
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO_ROOT, PYTHONUNBUFFERED="1",
                NANOCHAT_BASE_DIR=str(base), NANOCHAT_DATA_MAX_SHARD="3",
                NANOCHAT_EVAL_BUNDLE_URL=str(base / "bundle.zip"), TORCH_ELASTIC_SHUTDOWN_TIMEOUT="120")


def torchrun_cmd(*args):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "-m", "scripts.base_train", *TOY, *args]


def losses(base, tag):
    with open(base / "base_checkpoints" / tag / "log.jsonl") as f:
        return {r["step"]: r["raw_loss"] for r in map(json.loads, f) if "raw_loss" in r}


@pytest.mark.slow
def test_sigterm_to_torchrun_during_core_evaluation_saves_a_step_that_resumes_exactly(stop_base_dir):
    from nanochat.checkpoint_manager import list_steps
    base, env = stop_base_dir, torchrun_env(stop_base_dir)
    # the same 6 steps without interruption (CORE changes nothing in training, so it is left out here)
    done = subprocess.run(torchrun_cmd("--model_tag=whole"), cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    # CORE at step 3, all examples: SIGTERM to torchrun once the first task is done
    command = torchrun_cmd("--model_tag=stopped", "--core_metric_every=3", "--core_metric_max_per_task=-1")
    proc = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    output, sent = [], None
    deadline = time.time() + 600
    for line in proc.stdout:
        output.append(line)
        if sent is None and line.startswith("[ 1/8]"):
            proc.send_signal(signal.SIGTERM)
            sent = time.time()
        assert time.time() < deadline, "".join(output[-50:])
    proc.wait(timeout=300)
    text = "".join(output)
    assert sent is not None, text[-3000:]
    assert "CORE evaluation stopped after" in text and "Stopped at step 3" in text, text[-3000:]
    folder = base / "base_checkpoints" / "stopped"
    assert list_steps(str(folder)) == [3]
    meta = json.loads((folder / "meta_000003.json").read_text())
    assert set(meta["files"]) == {"model_000003.pt", "optim_000003_rank0.pt", "optim_000003_rank1.pt"}

    resumed = subprocess.run(torchrun_cmd("--model_tag=stopped", "--resume_from_step=3"), cwd=REPO_ROOT, env=env,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert losses(base, "stopped") == losses(base, "whole")
    whole = torch.load(base / "base_checkpoints" / "whole" / "model_000006.pt", weights_only=True)
    stopped = torch.load(folder / "model_000006.pt", weights_only=True)
    assert all(torch.equal(whole[k], stopped[k]) for k in whole)


@pytest.mark.slow
def test_a_settings_error_under_torchrun_is_printed_once(stop_base_dir):
    result = subprocess.run(torchrun_cmd("--total_batch_size=1000"), cwd=REPO_ROOT, env=torchrun_env(stop_base_dir),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert result.stdout.count("error: total_batch_size=1,000 is not a whole number") == 1, result.stdout
    # Only rank 0 fails by itself: rank 1 exits cleanly, unless torchrun stops it first (SIGTERM, -15) once rank 0
    # has failed, which depends on timing
    exit_codes = dict(re.findall(r"rank\s*:\s*(\d+) \(local_rank.*\n\s*exitcode\s*:\s*(-?\d+)", result.stderr))
    assert exit_codes.get("0") == "1", result.stderr
    assert exit_codes.get("1", "-15") == "-15", result.stderr


def test_timed_saves(stop_base_dir, monkeypatch):
    """save_every_minutes: a checkpoint as soon as that much time has passed since the last one (here: every step)."""
    from nanochat.checkpoint_manager import list_steps
    from test_base_train import run_train
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(stop_base_dir))
    monkeypatch.setenv("NANOCHAT_DATA_MAX_SHARD", "3")
    assert run_train([*TOY, "--model_tag=timed", "--save_every_minutes=0.00001", "--eval_every=-1"]) == 0
    assert list_steps(str(stop_base_dir / "base_checkpoints" / "timed")) == [1, 2, 3, 4, 5, 6]


def test_a_nonfinite_loss_names_the_checkpoint_to_continue_from_once(tmp_path, monkeypatch, capsys):
    from nanochat.checkpoint_manager import save_checkpoint
    from nanochat.training import stop_on_nonfinite_loss
    for step in (4, 8):
        save_checkpoint(str(tmp_path), step, {"w": torch.zeros(2)}, None, {"step": step})
    capsys.readouterr()
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit) as stopped:
        stop_on_nonfinite_loss("policy-gradient loss", 11, str(tmp_path))
    assert stopped.value.code == 1  # torchrun reports this rank's failure
    said = capsys.readouterr().out
    assert said.startswith("error: the policy-gradient loss became nan/inf at step 11") and "--resume_from_step=8" in said
    monkeypatch.setenv("RANK", "1")  # the other ranks saw the same summed flag: they leave quietly
    with pytest.raises(SystemExit) as stopped:
        stop_on_nonfinite_loss("policy-gradient loss", 11, str(tmp_path / "empty"))
    assert stopped.value.code == 0 and capsys.readouterr().out == ""
