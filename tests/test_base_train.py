"""
scripts/base_train.py at toy size (depth 2, 64-token sequences, a 300-token vocabulary trained here,
generated parquet data in a temporary NANOCHAT_BASE_DIR): derived numbers, schedules, exact resume
after Ctrl-C (fp32 and bf16 autocast, 1 and 2 processes, start-up choices that would come out otherwise),
nan handling, and a 2-process gloo run against 1 process.
"""

import ast
import json
import os
import runpy
import signal
import subprocess
import sys

import pytest
import torch

from conftest import environment, make_pretraining_base_dir

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO_ROOT, "scripts", "base_train.py")
VOCAB = 300
# 4 sequences of 64 tokens per micro-batch, 2 micro-batches per step in one process
TOY = ["--device_type=cpu", "--dtype=float32", "--compile=false", "--depth=2", "--max_seq_len=64",
       "--device_batch_size=4", "--total_batch_size=512", "--num_iterations=6", "--eval_every=3",
       "--eval_tokens=512", "--core_metric_every=-1", "--sample_every=-1"]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """Shards 0-2 for training, shard 3 for validation (row groups of 8 documents), and a tokenizer."""
    base = str(tmp_path_factory.mktemp("nanochat_base"))
    make_pretraining_base_dir(base, VOCAB)
    with environment(NANOCHAT_BASE_DIR=base, NANOCHAT_DATA_MAX_SHARD="3"):
        yield base


def run_train(args):
    """Run the script in this process (as `python -m scripts.base_train ARGS`); returns its exit code."""
    saved_argv = sys.argv
    saved_handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    sys.argv = [SCRIPT, *args]
    try:
        runpy.run_module("scripts.base_train", run_name="__main__")
        return 0
    except SystemExit as e:
        return e.code
    finally:
        sys.argv = saved_argv
        for s, handler in saved_handlers.items():
            signal.signal(s, handler)


def read_log(base, tag):
    with open(os.path.join(base, "base_checkpoints", tag, "log.jsonl")) as f:
        records = [json.loads(line) for line in f]
    train = {r["step"]: r for r in records if "loss" in r}
    evals = {r["step"]: r["val_bpb"] for r in records if "val_bpb" in r}
    return train, evals


def dry_run_numbers(args, capsys):
    assert run_train([*args, "--dry_run"]) == 0
    out = capsys.readouterr().out
    lines = out[out.index("Dry run"):].splitlines()[1:]
    return {k.strip(): float(v) for k, v in (line.split(":") for line in lines if ":" in line)}


# ---------------------------------------------------------------------------------------------
# derived numbers


@pytest.mark.parametrize("depth", [1, 2, 4, 12, 20])
def test_dims_params_and_horizon_follow_from_depth(base_dir, capsys, depth):
    n = dry_run_numbers(["--depth", str(depth), "--max_seq_len=64", "--device_batch_size=4", "--total_batch_size=1024"],
                        capsys)
    dim = 64 * depth
    heads = -(-dim // 128)
    assert (n["num_layers"], n["model_dim"], n["num_heads"], n["num_kv_heads"]) == (depth, dim, heads, heads)
    # untied embedding and lm_head, then per layer q,k,v,o (dim x dim) and a 4x MLP: 12 dim^2
    params = 2 * VOCAB * dim + 12 * depth * dim ** 2
    assert n["num_params"] == params
    assert n["flops_per_token"] == 6 * (params - VOCAB * dim) + 12 * depth * heads * (dim // heads) * 64
    assert n["grad_accum_steps"] == 1024 // (4 * 64)
    assert n["num_iterations"] == 20 * params // 1024  # tokens:params = 20 by default
    assert n["tokens_per_param"] == pytest.approx(n["num_iterations"] * 1024 / params, abs=1e-4)


def test_speedrun_numbers_without_a_tokenizer(tmp_path, capsys, monkeypatch):
    """d20 with the reference defaults: 561M params, 8 accumulation steps, 21,400 steps (vocab 65,536 assumed)."""
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    n = dry_run_numbers(["--depth=20", "--device_type=cpu"], capsys)
    assert n["num_params"] == 560_988_160 and n["grad_accum_steps"] == 8 and n["num_iterations"] == 21_400
    n = dry_run_numbers(["--depth=20", "--device_type=cpu", "--target_flops=1e18"], capsys)
    assert n["num_iterations"] == round(1e18 / (n["flops_per_token"] * 524288))
    n = dry_run_numbers(["--depth=20", "--device_type=cpu", "--target_flops=1e18", "--num_iterations=7"], capsys)
    assert n["num_iterations"] == 7  # explicit steps win over FLOPs


def test_impossible_batch_proposes_valid_values(base_dir, capsys):
    code = run_train(["--depth=2", "--max_seq_len=64", "--device_batch_size=8", "--total_batch_size=1280", "--dry_run"])
    out = capsys.readouterr().out
    assert code == 1
    assert "nearest valid --total_batch_size: 1024, 1536" in out
    assert "--device_batch_size that divides it: 2, 4, 5, 10" in out


def test_help_explains_the_settings(base_dir, capsys):
    assert run_train(["--help"]) == 0
    out = capsys.readouterr().out
    for text in ["Runtime", "Model", "Horizon", "Optimisation", "Evaluation", "Output", "--depth=20",
                 "--total_batch_size=524288", "--save_every=-1"]:
        assert text in out
    assert run_train(["--detph=4"]) == ("error: unknown setting 'detph' on the command line. "
                                        "Did you mean --depth? (--help lists them all)")


# ---------------------------------------------------------------------------------------------
# schedules: the functions exactly as written in the script, evaluated at the edges


def script_function(name, **settings):
    tree = ast.parse(open(SCRIPT).read())
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    namespace = dict(settings)
    exec(compile(ast.Module(body=[node], type_ignores=[]), SCRIPT, "exec"), namespace)
    return namespace[name]


def test_lr_schedule_edges():
    lr = script_function("get_lr_multiplier", num_iterations=100, warmup_ratio=0.0, warmdown_ratio=0.2,
                         final_lr_frac=0.0)
    assert [lr(0), lr(50), lr(80)] == [1.0, 1.0, 1.0]  # flat until the warmdown starts
    assert lr(81) == pytest.approx(0.95) and lr(99) == pytest.approx(0.05)
    assert lr(100) == 0.0  # the last (evaluation-only) step reaches final_lr_frac
    lr = script_function("get_lr_multiplier", num_iterations=100, warmup_ratio=0.1, warmdown_ratio=0.2,
                         final_lr_frac=0.1)
    assert lr(0) == pytest.approx(0.1) and lr(4) == pytest.approx(0.5) and lr(9) == 1.0 and lr(10) == 1.0
    assert lr(90) == pytest.approx(0.5 + 0.5 * 0.1) and lr(100) == pytest.approx(0.1)
    lr = script_function("get_lr_multiplier", num_iterations=10, warmup_ratio=0.0, warmdown_ratio=0.0,
                         final_lr_frac=0.0)
    assert all(lr(i) == 1.0 for i in range(11))  # no warmdown: constant


def test_muon_momentum_ramp():
    from nanochat.training import muon_momentum as momentum
    assert momentum(0) == 0.85
    assert momentum(150) == pytest.approx(0.90)
    assert momentum(300) == pytest.approx(0.95) and momentum(10_000) == pytest.approx(0.95)


def test_machine_choices_helpers(monkeypatch, capsys):
    """Older checkpoints' "precision" entry, compile's rule, and a resume on a machine with fewer CPUs."""
    from nanochat import training
    assert training.saved_machine_choices(None) == {}
    older = {"loop_state": {"precision": {"autocast": "bfloat16", "newton_schulz": "float32"}}}
    assert training.saved_machine_choices(older) == {"autocast": "bfloat16", "newton_schulz": "float32"}
    assert training.use_torch_compile("auto", {}, "cpu", 31.0) and not training.use_torch_compile("auto", {}, "cpu", 29.0)
    assert training.use_torch_compile("auto", {"compile": True}, "cpu", 0.0)  # the saved choice, not the estimate
    assert not training.use_torch_compile("false", {"compile": True}, "cpu", 1e9)  # an explicit setting wins
    threads = torch.get_num_threads()
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)  # a machine with one CPU
    try:
        training.reuse_thread_count({"threads": 4}, "cpu")
        assert torch.get_num_threads() == threads
        assert "computed with 4 CPU threads, more than the 1 CPUs available here" in capsys.readouterr().out
        training.reuse_thread_count({"threads": 1}, "cpu")
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)


def test_batch_size_suggestions():
    batch_size_suggestions = script_function("batch_size_suggestions")
    # 8 x 64 x 1 = 512 tokens per micro-batch does not divide 1280
    msg = batch_size_suggestions(1280, 8, 64, 1)
    assert "1024, 1536" in msg  # the nearest multiples of 512
    assert "--device_batch_size that divides it: 2, 4, 5, 10" in msg  # 1280 / 64 = 20 rows: the divisors nearest 8
    # nothing divides when the sequence length itself does not
    assert "no device_batch_size works" in batch_size_suggestions(1000, 4, 64, 1)
    # world size counts
    assert "2048, 3072" in batch_size_suggestions(2560, 8, 64, 2)


# ---------------------------------------------------------------------------------------------
# training, checkpoints, exact resume, faults


@pytest.fixture(scope="module")
def full_run(base_dir):
    """
    6 uninterrupted steps. A sample at step 4 runs the Engine (whose decode step tries thread counts) in the middle
    of the stretch that the resumed run redoes without sampling (and one at the end).
    """
    assert run_train([*TOY, "--model_tag=full", "--sample_every=4"]) == 0
    return base_dir


def test_training_writes_checkpoint_and_log(full_run):
    folder = os.path.join(full_run, "base_checkpoints", "full")
    assert sorted(f for f in os.listdir(folder) if not f.endswith(".jsonl")) == \
        ["meta_000006.json", "model_000006.pt", "optim_000006_rank0.pt"]  # save_every=-1: only at the end
    meta = json.load(open(os.path.join(folder, "meta_000006.json")))
    assert meta["step"] == 6 and meta["max_seq_len"] == 64 and meta["device_batch_size"] == 4
    assert meta["model_config"] == dict(sequence_len=64, vocab_size=VOCAB, n_layer=2, n_head=1, n_kv_head=1, n_embd=128)
    assert meta["user_config"]["depth"] == 2 and meta["dataloader_state_dict"] is not None
    assert {"min_val_bpb", "smooth_train_loss", "total_training_time", "rng"} <= meta["loop_state"].keys()
    assert meta["loop_state"]["machine_choices"]["autocast"] == "float32"  # --dtype=float32
    assert meta["loop_state"]["machine_choices"]["compile"] is False  # --compile=false
    # what a sweep reads back (scripts/scaling_laws.py): the sizes, the horizon, and the wall time of the run
    params = 2 * VOCAB * 128 + 12 * 2 * 128 ** 2
    assert (meta["num_params"], meta["num_params_no_embedding"]) == (params, params - VOCAB * 128)
    assert meta["flops_per_token"] == 6 * (params - VOCAB * 128) + 12 * 2 * 128 * 64 and meta["num_iterations"] == 6
    assert meta["loop_state"]["wall_time"] > 0
    train, evals = read_log(full_run, "full")
    assert sorted(train) == list(range(6)) and sorted(evals) == [0, 3, 6]
    assert {"step", "loss", "lr_mult", "dt", "tok_per_sec", "mfu", "total_time"} <= train[0].keys()
    # zero lm_head: uniform
    assert train[0]["raw_loss"] == pytest.approx(torch.log(torch.tensor(float(VOCAB))).item(), abs=1e-4)
    assert train[5]["raw_loss"] < train[0]["raw_loss"] - 1.0  # it learns
    assert evals[6] < evals[0] and meta["val_bpb"] == evals[6]
    assert [train[i]["lr_mult"] for i in range(6)] == [1.0] * 6  # round(0.2 * 6) = 1 warmdown step starts after step 5


def interrupt_then_resume(base, args, tag, monkeypatch, before_resume=lambda: None):
    """
    Run `args` under model tag `tag`, stopped by Ctrl-C during step 2 (it saves step 3 and exits), call
    before_resume, then resume from step 3 to the end. Returns the meta of step 3 as saved.
    """
    import nanochat.dataloader as dataloader
    real_loader = dataloader.tokenizing_distributed_data_loader

    def interrupting_loader(*args, **kwargs):
        for i, batch in enumerate(real_loader(*args, **kwargs)):
            if kwargs.get("split") == "train" and i == 6:  # batch 0 up front, then 2 per step: fetched in step 2
                os.kill(os.getpid(), signal.SIGINT)
            yield batch

    with monkeypatch.context() as patch:
        patch.setattr(dataloader, "tokenizing_distributed_data_loader", interrupting_loader)
        assert run_train([*args, f"--model_tag={tag}"]) == 0
    folder = os.path.join(base, "base_checkpoints", tag)
    assert sorted(f for f in os.listdir(folder) if not f.endswith(".jsonl")) == \
        ["meta_000003.json", "model_000003.pt", "optim_000003_rank0.pt"]
    assert sorted(read_log(base, tag)[0]) == [0, 1, 2]
    before_resume()
    assert run_train([*args, f"--model_tag={tag}", "--resume_from_step=3"]) == 0
    return json.load(open(os.path.join(folder, "meta_000003.json")))


def assert_same_training(base, tag, other_tag):
    """Bit-identical losses (raw and smoothed) at every step, evaluations and final weights."""
    train, evals = read_log(base, tag)
    other_train, other_evals = read_log(base, other_tag)
    assert sorted(other_train) == sorted(train) == list(range(6))
    assert [other_train[i]["raw_loss"] for i in range(6)] == [train[i]["raw_loss"] for i in range(6)]
    assert [other_train[i]["loss"] for i in range(6)] == [train[i]["loss"] for i in range(6)]  # EMA state too
    assert other_evals == evals
    weights = torch.load(os.path.join(base, "base_checkpoints", tag, "model_000006.pt"))
    other_weights = torch.load(os.path.join(base, "base_checkpoints", other_tag, "model_000006.pt"))
    assert all(torch.equal(weights[k], other_weights[k]) for k in weights)


def test_ctrl_c_saves_and_resume_is_exact(full_run, monkeypatch):
    """Ctrl-C during step 2 -> checkpoint at step 3 -> resume: steps 3-5 and the final weights equal the uninterrupted
    run's (which sampled between its steps; these runs do not)."""
    interrupt_then_resume(full_run, TOY, "split", monkeypatch)
    assert_same_training(full_run, "full", "split")
    # the wall time adds up both sessions: more than the first one's, which ended at step 3
    folder = os.path.join(full_run, "base_checkpoints", "split")
    first = json.load(open(os.path.join(folder, "meta_000003.json")))["loop_state"]["wall_time"]
    assert json.load(open(os.path.join(folder, "meta_000006.json")))["loop_state"]["wall_time"] > first > 0


def test_resume_makes_the_choices_it_saved_in_bf16(base_dir, monkeypatch, another_machine, capsys):
    """
    The default dtype=auto and compile=auto, measured as bf16-fast (bf16 autocast and Newton-Schulz): a resume
    on a machine where every start-up measurement comes out the other way (and another thread count) makes
    the saved choices, and continues the uninterrupted bf16 run exactly.
    """
    from nanochat import hardware
    monkeypatch.setattr(hardware, "bf16_matmul_speedup", lambda device: 10.0)
    monkeypatch.setattr(hardware, "peak_flops", lambda device, dtype=torch.bfloat16: 1e12)  # short run: no compile
    auto = [a for a in TOY if not a.startswith(("--dtype", "--compile"))]
    assert run_train([*auto, "--model_tag=bf16_full", "--sample_every=2"]) == 0
    saved = interrupt_then_resume(base_dir, auto, "bf16_split", monkeypatch, before_resume=another_machine)
    choices = saved["loop_state"]["machine_choices"]
    assert choices == {"autocast": "bfloat16", "newton_schulz": "bfloat16", "compile": False,
                       "threads": choices["threads"]}
    out = capsys.readouterr().out
    resumed = out[out.index("Resuming from step 3"):]
    assert f"Precision: bf16 autocast | torch.compile: False | CPU threads: {choices['threads']} |" in resumed
    assert "Muon Newton-Schulz precision: bfloat16" in resumed
    assert torch.get_num_threads() == choices["threads"]
    final = json.load(open(os.path.join(base_dir, "base_checkpoints", "bf16_split", "meta_000006.json")))
    assert final["loop_state"]["machine_choices"] == choices
    assert_same_training(base_dir, "bf16_full", "bf16_split")


def test_the_thread_state_is_set_at_start_up_and_sampling_leaves_it(base_dir):
    """
    compute_init sets the thread count explicitly, which also turns MKL's dynamic threading off for good: the
    state that the Engine's decode-thread trial (set_num_threads) would otherwise leave behind after the first
    sample, changing the last bits of every later fp32 matmul on MKL's Intel code paths. Read with MKL's own
    getter in a fresh process; skipped where torch has no MKL (e.g. Arm builds).
    """
    code = """if True:
        import ctypes, json, os, torch
        from nanochat.common import compute_init
        from nanochat.engine import greedy_sample
        from nanochat.gpt import GPTConfig, build_gpt
        from nanochat.tokenizer import get_tokenizer
        try:
            mkl_dynamic = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")).mkl_serv_get_dynamic
        except (OSError, AttributeError):
            raise SystemExit(3)
        compute_init("cpu")
        state = (torch.get_num_threads(), mkl_dynamic())
        model = build_gpt(GPTConfig(sequence_len=64, vocab_size=300, n_layer=1, n_head=1, n_kv_head=1, n_embd=64))
        model.eval()
        greedy_sample(model, get_tokenizer(), "The cat", 8, torch.autocast("cpu", enabled=False))
        print(json.dumps([state, (torch.get_num_threads(), mkl_dynamic())]))
    """
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONPATH=REPO_ROOT)  # more than one: the Engine tries one thread
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    if result.returncode == 3:
        pytest.skip("this torch build has no MKL")
    assert result.returncode == 0, result.stderr[-3000:]
    at_start_up, after_sampling = json.loads(result.stdout.strip().splitlines()[-1])
    assert at_start_up == [2, 0]  # 2 threads, MKL's dynamic threading off
    assert after_sampling == at_start_up


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(base_dir, monkeypatch, capsys):
    from nanochat.gpt import GPT
    real_forward = GPT.forward
    calls = {"train": 0}

    def forward_going_nan(self, idx, targets=None, *args, **kwargs):
        out = real_forward(self, idx, targets, *args, **kwargs)
        if self.training and targets is not None:
            calls["train"] += 1
            if calls["train"] > 6:  # from step 3 on (2 micro-batches per step)
                return out * float("nan")
        return out

    monkeypatch.setattr(GPT, "forward", forward_going_nan)
    assert run_train([*TOY, "--model_tag=nan", "--save_every=2", "--eval_every=-1"]) == 1
    out = capsys.readouterr().out
    assert "became nan/inf at step 3" in out and "--resume_from_step=2" in out
    folder = os.path.join(base_dir, "base_checkpoints", "nan")
    assert sorted(f for f in os.listdir(folder) if not f.endswith(".jsonl")) == \
        ["meta_000002.json", "model_000002.pt", "optim_000002_rank0.pt"]
    weights = torch.load(os.path.join(folder, "model_000002.pt"))
    assert all(torch.isfinite(w).all() for w in weights.values())


def torchrun_two(*args):
    """torchrun --nproc_per_node=2 (gloo, one thread each) of base_train at toy size; returns its stdout."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO_ROOT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "scripts.base_train", *TOY, *args]
    result = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


@pytest.mark.slow
def test_two_processes_match_one(full_run):
    """
    torchrun --nproc_per_node=2 (gloo) with the same total batch: one micro-batch per rank instead of
    two accumulated in one process. The ranks read other documents than the single process (row
    groups are strided over ranks), so the curves agree up to data noise: the same first loss (ln V:
    lm_head starts at zero) and within 0.15 nats per step after it. Then a 2-process resume from
    step 3 (per-rank optimizer shards and data positions) repeats steps 3-5 exactly.
    """
    assert "Distributed world size: 2" in torchrun_two("--model_tag=ddp", "--save_every=3")
    folder = os.path.join(full_run, "base_checkpoints", "ddp")
    assert {"optim_000006_rank0.pt", "optim_000006_rank1.pt", "model_000006.pt"} <= set(os.listdir(folder))
    meta = json.load(open(os.path.join(folder, "meta_000006.json")))
    assert len(meta["dataloader_state_dict"]["ranks"]) == 2  # every rank's data position, for an exact resume
    one, _ = read_log(full_run, "full")
    two, _ = read_log(full_run, "ddp")
    assert two[0]["raw_loss"] == pytest.approx(one[0]["raw_loss"], abs=1e-5)
    for step in range(1, 6):
        assert abs(two[step]["raw_loss"] - one[step]["raw_loss"]) < 0.15, (step, one, two)

    first_weights = torch.load(os.path.join(folder, "model_000006.pt"))
    torchrun_two("--model_tag=ddp", "--save_every=3", "--resume_from_step=3")
    resumed, _ = read_log(full_run, "ddp")
    assert [resumed[i]["raw_loss"] for i in range(6)] == [two[i]["raw_loss"] for i in range(6)]
    resumed_weights = torch.load(os.path.join(folder, "model_000006.pt"))
    assert all(torch.equal(first_weights[k], resumed_weights[k]) for k in first_weights)


@pytest.mark.slow
def test_two_processes_resume_exactly_in_bf16(base_dir):
    """The same 2-process resume under bf16 autocast, the first run sampling (rank 0 only) at steps 2 and 4."""
    torchrun_two("--model_tag=ddp_bf16", "--dtype=bfloat16", "--save_every=3", "--sample_every=2")
    folder = os.path.join(base_dir, "base_checkpoints", "ddp_bf16")
    first, first_evals = read_log(base_dir, "ddp_bf16")
    first_weights = torch.load(os.path.join(folder, "model_000006.pt"))
    torchrun_two("--model_tag=ddp_bf16", "--dtype=bfloat16", "--save_every=3", "--resume_from_step=3")
    resumed, resumed_evals = read_log(base_dir, "ddp_bf16")
    assert json.load(open(os.path.join(folder, "meta_000006.json")))["loop_state"]["machine_choices"]["autocast"] \
        == "bfloat16"
    assert [resumed[i]["raw_loss"] for i in range(6)] == [first[i]["raw_loss"] for i in range(6)]
    assert resumed_evals == first_evals
    resumed_weights = torch.load(os.path.join(folder, "model_000006.pt"))
    assert all(torch.equal(first_weights[k], resumed_weights[k]) for k in first_weights)
