"""
The measuring scripts in dev/ run end to end at toy size (their numbers are not checked, only that
they produce them): dev/loss_memory.py (peak memory, ours vs the plain loss), dev/profile_step.py,
dev/profile_decode.py (whose parts of a step must add up), dev/bench_engine.py (decode speed; without the
reference), dev/bench_sandbox.py (the sandbox's cost per problem), dev/bench_mkl_threading.py,
dev/bench_allocator.py, and how dev/reference.py loads another checkout next to ours (dev/bench_train_ab.py
says what it needs without one).
"""

import os
import subprocess
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = ["--depth=1", "--seq_len=32", "--batch_size=2", "--vocab_size=64"]


def run(module, *args):
    result = subprocess.run([sys.executable, "-m", module, *TOY, *args], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result.stdout


def test_loss_memory_measures_ours_and_plain():
    out = run("dev.loss_memory", "--dtype=bfloat16")
    assert "ours " in out and "plain " in out and "ours / plain:" in out


def test_loss_memory_names_what_the_reference_variant_needs():
    result = subprocess.run([sys.executable, "-m", "dev.loss_memory", *TOY, "--variants=ours,reference"], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode != 0 and "--ref_dir" in result.stderr + result.stdout


@pytest.mark.slow
def test_profile_step_prints_the_breakdown():
    out = run("dev.profile_step", "--compile=false", "--warmup=1", "--steps=1", "--dtype=float32")
    for kind in ("matmul", "attention", "elementwise", "optimizer", "MFU"):
        assert kind in out


def test_profile_decode_splits_each_step_into_parts_that_add_up():
    result = subprocess.run([sys.executable, "-m", "dev.profile_decode", "--depth=1", "--vocab_size=64",
                             "--max_tokens=6", "--batch_sizes=1,2", "--mode=eager", "--dtype=float32", "--repeats=1"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    blocks = result.stdout.split("\nbatch ")[1:]
    assert [block.split(":")[0] for block in blocks] == ["1", "2"]
    for block in blocks:
        shares = {}
        for line in block.splitlines()[1:7]:
            kind, microseconds, percent = line.strip().rsplit(None, 3)[0], *line.split()[-3::2]
            shares[kind] = (float(microseconds), float(percent.rstrip("%")))
        assert list(shares) == ["matmul", "attention", "kernels", "step overhead", "sampling", "engine loop"]
        assert all(us >= 0 for us, _ in shares.values()), shares  # nothing counted twice
        assert shares["matmul"][0] > 0 and shares["sampling"][0] > 0, shares
        assert abs(sum(percent for _, percent in shares.values()) - 100) < 0.5, shares


def test_bench_engine_times_fp32_and_auto_without_the_reference(tmp_path):
    # a random depth-1 model (no checkpoint in an empty base dir); the greedy tokens are checked against naive decoding
    result = subprocess.run([sys.executable, "-m", "dev.bench_engine", "--depth=1", "--max_tokens=4", "--repeats=1",
                             "--batch_sizes=1,2", "--ttft_prompt_len=8", "--ref_dir=", "--threads=1"], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, NANOCHAT_BASE_DIR=str(tmp_path)))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "naive full forward: True" in result.stdout and "Time to first token" in result.stdout


def test_bench_mkl_threading_compares_a_fresh_process_with_compute_init():
    out = run("dev.bench_mkl_threading", "--rounds=1", "--steps=1")
    assert "each kind computes the same gradients in every process: True" in out
    assert "the two kinds compute bit-identical gradients:" in out and "MKL fixed (compute_init)" in out


def test_bench_allocator_times_both_malloc_settings_in_processes_of_their_own():
    out = run("dev.bench_allocator", "--rounds=1", "--steps=2")
    assert "round 1 keep :" in out and "round 1 glibc:" in out and "x faster kept" in out


def test_load_checkout_points_its_imports_at_its_own_modules(tmp_path):
    # a stand-in checkout whose gpt imports from its own common: loaded next to ours, neither shadows the other
    package = tmp_path / "nanochat"
    package.mkdir()
    (package / "common.py").write_text("WHO = 'other checkout'\n")
    (package / "gpt.py").write_text("from nanochat.common import WHO\nimport nanochat.common as ours\n")
    sys.path.insert(0, REPO_ROOT)
    from dev.reference import load_checkout
    import nanochat.common
    (gpt,) = load_checkout(str(tmp_path), "other_", ("common",), ("gpt",))
    assert gpt.WHO == "other checkout" and sys.modules["other_common"].WHO == "other checkout"
    assert gpt.ours is nanochat.common and not hasattr(nanochat.common, "WHO")


def test_bench_train_ab_says_what_it_needs():
    result = subprocess.run([sys.executable, "-m", "dev.bench_train_ab", "--ref_dir=/nonexistent"], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=600, env=dict(os.environ, REF_DIR=""))
    assert result.returncode != 0 and "karpathy/nanochat at f37d45c" in result.stdout + result.stderr


def test_bench_sandbox_times_each_mode_and_compares_verdicts():
    # generated problems; our own execution.py stands in for another checkout's
    result = subprocess.run([sys.executable, "-m", "dev.bench_sandbox", "--problems=2", "--data=",
                             f"--baseline={REPO_ROOT}/nanochat/execution.py"], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "ms/call" in result.stdout and "namespaces " in result.stdout and "verdicts agree across modes" in result.stdout
