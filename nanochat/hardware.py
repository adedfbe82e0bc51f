"""
What the hardware is good at, decided by looking and by measuring rather than by habit.

- cpu_model(), cpu_flags() / cpu_has_native_bf16(): which CPU; does the CPU have bf16 dot-product or matrix units
  (x86 avx512_bf16 / amx_bf16, Arm bf16)? Without them PyTorch emulates bf16 matmuls, far slower than fp32.
- bf16_matmul_speedup(device): measured once per process and device (~0.1 s); rank 0's in a distributed run.
- newton_schulz_dtype(device), choose_autocast_dtype(device): the precision choices built on that.
  (The same choice for generation, measured with the decode step's own matmuls: nanochat/decode.py.)
- peak_flops(device): the denominator of MFU; a table of datasheet numbers for known GPUs, a short
  measured matmul peak otherwise (CPU, unknown accelerators).
- keep_freed_memory(): glibc's malloc keeps freed memory for reuse (a CPU training step ~1.1x faster).
- omp_threads_sleep(): whether OpenMP's idle threads sleep at once (OMP_WAIT_POLICY=PASSIVE), slow for decoding.
"""

import ctypes
import functools
import os
import platform
import time

import torch
import torch.distributed as dist

# Dense bf16 tensor-core peaks from NVIDIA datasheets (no 2:4 sparsity), matched as substrings of
# torch.cuda.get_device_name(); first match wins, so the more specific names come first.
GPU_BF16_PEAK_FLOPS = [
    ("GH200", 989e12),
    ("H200", 989e12),
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM, e.g. "NVIDIA H100 80GB HBM3"
    ("H800", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
]

# Autocast pays for casts and bf16 elementwise work, so the model gains less than its matmuls do (measured
# with dev/bench_step.py): below a 1.5x matmul speedup we expect no gain and stay in fp32.
MIN_BF16_SPEEDUP = 1.5


@functools.lru_cache(maxsize=None)
def cpuinfo():
    """The first value of each field of /proc/cpuinfo ('model name', x86 'flags', Arm 'Features', ...)."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass  # not Linux
    return fields


def cpu_model():
    return cpuinfo().get("model name") or platform.processor() or platform.machine()


def cpu_flags():
    """The CPU feature flags (x86 'flags' or Arm 'Features'); empty where unavailable."""
    return frozenset((cpuinfo().get("flags") or cpuinfo().get("Features") or "").split())


def cpu_has_native_bf16():
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16", "bf16"})


def mkl_runs_generic_code():
    """
    Whether torch's fp32 CPU matmuls (MKL's) run MKL's generic code: MKL picks its kernels by CPU vendor, and on an
    x86 CPU not made by Intel it takes that path (on a 2-core AMD EPYC, one row times 8192 x 256: 213 us, against
    75 us on MKL's Intel path there, dev/mkl_intel_path.sh; oneDNN's own kernels: 80 us).
    """
    vendor = cpuinfo().get("vendor_id")
    return torch.backends.mkl.is_available() and vendor is not None and vendor != "GenuineIntel"


def cpu_description():
    """
    The CPU and its bf16 units, for benchmark headers: 'AMD EPYC (AMX-BF16: no, AVX512-BF16: yes)', and how its
    idle threads wait when that is set (OMP_WAIT_POLICY: decoding speed depends on it, see omp_threads_sleep).
    """
    flags = cpu_flags()
    units = ", ".join(f"{name}: {'yes' if flag in flags else 'no'}"
                      for name, flag in (("AMX-BF16", "amx_bf16"), ("AVX512-BF16", "avx512_bf16")))
    wait = f"; OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}" if os.environ.get("OMP_WAIT_POLICY") else ""
    return f"{cpu_model()} ({units}{', Arm bf16: yes' if 'bf16' in flags else ''}){wait}"


# glibc's mallopt parameters (malloc.h) and their initial values
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4
GLIBC_INITIAL_MALLOPT = {M_TRIM_THRESHOLD: 128 * 1024, M_MMAP_THRESHOLD: 128 * 1024, M_MMAP_MAX: 65536}


def omp_threads_sleep():
    """
    Whether OpenMP's idle threads sleep as soon as they wait (OMP_WAIT_POLICY=PASSIVE, read as the process starts)
    instead of spinning a little first: good for training on a busy machine, but then each of a decode step's many
    small parallel kernels waits for a thread to wake (a quiet 2-core AMD EPYC: compiled decoding 475 vs 2,356
    tok/s at batch 1).
    """
    return os.environ.get("OMP_WAIT_POLICY", "").strip().upper() == "PASSIVE"


def keep_freed_memory(keep=True):
    """
    keep=True: glibc's malloc keeps the memory the process frees for its next allocations. By default it hands
    large blocks back to the kernel (mapped on their own, or trimmed off the top of the heap), and a CPU training
    step, which frees and allocates the same tensors every step, then got them back as fresh pages that the kernel
    zeroes on first touch: ~40,000 page faults per depth-4 step, which took ~1.1x as long as without them
    (dev/bench_allocator.py). The cost: the process's resident memory stays at its peak.
    keep=False: glibc's initial settings, which a process that never calls this runs under (its dynamic threshold
    for large blocks starts from them; set here, it stays fixed). Returns False where malloc is not glibc's.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    mallopt = ctypes.CDLL("libc.so.6").mallopt
    settings = {M_TRIM_THRESHOLD: 2 ** 31 - 1, M_MMAP_MAX: 0} if keep else GLIBC_INITIAL_MALLOPT
    return all(mallopt(parameter, value) == 1 for parameter, value in settings.items())


def device_key(device):
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def measure_matmul_flops(device, dtype, size=512, batch=4, seconds=0.05):
    """Achieved FLOP/s of a batched (size x size) @ (size x size) matmul, best of repeated timings."""
    device = device_key(device)
    generator = torch.Generator(device=device).manual_seed(0)  # leaves the global RNG (model init) untouched
    a = torch.randn(batch, size, size, device=device, generator=generator).to(dtype)
    b = torch.randn(batch, size, size, device=device, generator=generator).to(dtype)
    # Untimed first for as long as the timing: kernel selection, page faults, and clocks and thread pools
    # coming up to speed (a cold measurement can read half the peak)
    warm_until = time.perf_counter() + seconds
    while True:
        torch.bmm(a, b)
        _sync(device)
        if time.perf_counter() >= warm_until:
            break
    best = float("inf")
    deadline = time.perf_counter() + seconds
    reps = 0
    while reps < 3 or (time.perf_counter() < deadline and reps < 100):
        t0 = time.perf_counter()
        torch.bmm(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
        reps += 1
    return 2 * batch * size ** 3 / best


def rank_zeros(measured, device):
    """
    A figure measured on a CPU as rank 0 measured it, in a distributed run (else as given): the ranks of one run
    must make the same choices from it (they change the numbers, and a resumed run repeats rank 0's saved ones),
    but each measures under its own load. Every rank calls this at the same point (a collective).
    """
    if device.type != "cpu" or not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return measured
    agreed = torch.tensor([measured], dtype=torch.float64)
    dist.broadcast(agreed, src=0)
    return agreed.item()


@functools.lru_cache(maxsize=None)
def _bf16_matmul_speedup(device):
    return rank_zeros(_measured_bf16_matmul_speedup(device), device)


def _measured_bf16_matmul_speedup(device):
    if device.type == "cuda":
        return float("inf") if torch.cuda.is_bf16_supported() else 0.0  # tensor cores; no need to measure
    if device.type == "cpu" and not cpu_has_native_bf16():
        return 0.0  # emulated bf16: known to be much slower, skip the measurement
    try:
        fp32 = measure_matmul_flops(device, torch.float32)
        bf16 = measure_matmul_flops(device, torch.bfloat16)
    except (RuntimeError, TypeError):  # e.g. a backend without bf16 matmul
        return 0.0
    return bf16 / fp32


def bf16_matmul_speedup(device):
    """bf16 / fp32 matmul throughput on this device (inf on CUDA with bf16, 0 where bf16 is not native)."""
    return _bf16_matmul_speedup(device_key(device))


def newton_schulz_dtype(device):
    """Muon's orthogonalisation runs in bf16 (as the reference always does) only where bf16 matmuls are clearly
    faster; the margin keeps a borderline CPU from choosing differently from one process to the next."""
    return torch.bfloat16 if bf16_matmul_speedup(device) >= MIN_BF16_SPEEDUP else torch.float32


def choose_autocast_dtype(device):
    """torch.bfloat16 if forward/backward should run under bf16 autocast on this device, else None (plain fp32)."""
    return torch.bfloat16 if bf16_matmul_speedup(device) >= MIN_BF16_SPEEDUP else None  # inf on CUDA with bf16


@functools.lru_cache(maxsize=None)
def _peak_flops(device, dtype):
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops in GPU_BF16_PEAK_FLOPS:
            if key in name:
                return flops if dtype == torch.bfloat16 else flops / 2  # tf32 is half of bf16 on these parts
    # CPU, MPS or an unknown GPU: measure a larger matmul a bit longer
    size = 2048 if device.type == "cuda" else 1024
    return measure_matmul_flops(device, dtype, size=size, batch=2, seconds=0.2)


def peak_flops(device, dtype=torch.bfloat16):
    """Peak matmul FLOP/s for MFU: datasheet for known GPUs, else measured (cached per process)."""
    return _peak_flops(device_key(device), dtype)
