#!/usr/bin/env bash
# Run a command with MKL on its Intel code paths on another x86 CPU (e.g. an AMD EPYC), to reproduce there what
# only Intel CPUs showed (issue 26: exact resume failed on an Intel Xeon, passed on an EPYC). MKL picks its
# kernels by CPU vendor; a two-function shim preloaded over torch's library answers "Intel". Needs a C compiler.
# MKL_VERBOSE=1 shows the path taken ("Intel(R) AVX-512 ..." instead of "Intel(R) Architecture processors").
# It also shows how much of a speed ratio against the reference on such a CPU is MKL's: the reference's fp32
# matmuls are MKL's, ours in bf16 are not (README, "CPU speed on two kinds of CPU").
#
#   bash dev/mkl_intel_path.sh python -m pytest tests/test_base_train.py -k resume
#   bash dev/mkl_intel_path.sh python -m dev.bench_mkl_threading
#   bash dev/mkl_intel_path.sh python -m dev.bench_engine --ref_dir=REF --modes=eager,compile
set -euo pipefail
shim_dir=$(mktemp -d)
trap 'rm -rf "$shim_dir"' EXIT
printf 'int mkl_serv_intel_cpu_true(void) { return 1; }\nint mkl_serv_intel_cpu(void) { return 1; }\n' \
    > "$shim_dir/intel.c"
cc -shared -fPIC -O2 -o "$shim_dir/intel.so" "$shim_dir/intel.c"
LD_PRELOAD="$shim_dir/intel.so${LD_PRELOAD:+:$LD_PRELOAD}" "$@"
