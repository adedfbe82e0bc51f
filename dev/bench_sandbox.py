"""
The sandbox's cost per HumanEval problem, against another checkout's nanochat/execution.py, and whether they agree.

    python -m dev.bench_sandbox [--problems=40] [--repeats=1] [--baseline=../main/nanochat/execution.py]
                                [--data=../shared/data/tasks/openai/openai_humaneval/openai_humaneval/test/0000.parquet]
                                [--python=/usr/bin/python3]

For each of the first --problems problems, its canonical solution and a broken one (the body replaced by
`return None`) are judged by:
  baseline:   the other checkout's execute_code on prompt + solution + test + `check(entry_point)`, as
              tasks/humaneval.py did before the verdict moved out of the program's process
  namespaces: ours, test= and entry_point= as tasks/humaneval.py calls it now
  fallback:   ours with namespaces=False (as root, run with --python, which every user must be able to read)
taking turns problem by problem, so that a busy machine slows them alike. Prints milliseconds per call (mean and
median) with the ratio to the baseline, and the programs on which the verdicts differ. --data= (empty) uses a
generated set of small problems instead of HumanEval.
"""

import argparse
import importlib.util
import os
import statistics
import sys
import time

from nanochat.execution import SandboxUnavailable, execute_code
from tasks.humaneval import extract_imports

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HUMANEVAL = os.path.join(REPO_ROOT, "..", "shared", "data", "tasks", "openai", "openai_humaneval", "openai_humaneval",
                         "test", "0000.parquet")


def load_problems(path, count):
    if not path:  # small made-up problems in HumanEval's format
        return [{"prompt": f"def f{i}(xs):\n    \"\"\"Sum of xs plus {i}.\"\"\"\n", "entry_point": f"f{i}",
                 "canonical_solution": f"    return sum(xs) + {i}\n",
                 "test": f"def check(candidate):\n    assert candidate([1, 2]) == {3 + i}\n    assert candidate([]) == {i}\n"}
                for i in range(count)]
    import pyarrow.parquet as pq
    return pq.read_table(path).to_pylist()[:count]


def load_baseline(path):
    spec = importlib.util.spec_from_file_location("baseline_execution", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", type=int, default=40, help="how many problems (HumanEval has 164)")
    parser.add_argument("--repeats", type=int, default=1, help="times each program is judged by each mode")
    parser.add_argument("--baseline", default=os.path.join(REPO_ROOT, "..", "main", "nanochat", "execution.py"),
                        help="execution.py of the checkout to compare with ('' for none)")
    parser.add_argument("--data", default=HUMANEVAL, help="HumanEval's parquet file ('' for generated problems)")
    parser.add_argument("--python", default="", help="the interpreter of our fallback (default: this one)")
    args = parser.parse_args()

    problems = load_problems(args.data, args.problems)
    judges = {}
    if args.baseline:
        if not os.path.isfile(args.baseline):
            raise SystemExit(f"--baseline={args.baseline}: no such file (give another checkout's "
                             "nanochat/execution.py, or --baseline= for none)")
        baseline = load_baseline(args.baseline)
        judges["baseline"] = lambda p, solution: baseline.execute_code(
            "\n\n".join([extract_imports(p["prompt"]), solution, p["test"]]) + f"\ncheck({p['entry_point']})").success
    for name, namespaces in (("namespaces", True), ("fallback", False)):
        judges[name] = lambda p, solution, namespaces=namespaces: execute_code(
            "\n\n".join([extract_imports(p["prompt"]), solution]), test=p["test"], entry_point=p["entry_point"],
            test_setup=p["prompt"], namespaces=namespaces, python=args.python or None).success
    try:
        execute_code("pass", namespaces=False, python=args.python or None)
    except SandboxUnavailable as e:
        print(f"fallback: left out ({e})")
        del judges["fallback"]

    print(f"{len(problems)} problems x 2 solutions x {args.repeats} repeats; modes: {', '.join(judges)}")
    times = {name: [] for name in judges}
    verdicts = {name: {} for name in judges}
    start = time.perf_counter()
    for i, problem in enumerate(problems):
        solutions = {"canonical": problem["prompt"] + problem["canonical_solution"],
                     "broken": problem["prompt"] + "    return None\n"}
        for _ in range(args.repeats):
            for kind, solution in solutions.items():
                for name, judge in judges.items():
                    t0 = time.perf_counter()
                    verdicts[name][(i, kind)] = judge(problem, solution)
                    times[name].append(time.perf_counter() - t0)
        done = i + 1
        eta = (time.perf_counter() - start) / done * (len(problems) - done)
        print(f"\r{done}/{len(problems)} problems, ETA {eta:.0f} s   ", end="", flush=True)
    print()

    reference = times.get("baseline")
    print(f"{'mode':<12}{'ms/call':>10}{'median':>10}{'vs baseline':>13}")
    for name, samples in times.items():
        ratio = f"{statistics.mean(samples) / statistics.mean(reference):.2f}" if reference else "-"
        print(f"{name:<12}{1000 * statistics.mean(samples):>10.0f}{1000 * statistics.median(samples):>10.0f}"
              f"{ratio:>13}")
    for name, judged in verdicts.items():
        passed = sum(judged[(i, "canonical")] for i in range(len(problems)))
        rejected = sum(not judged[(i, "broken")] for i in range(len(problems)))
        print(f"{name}: canonical solutions passed {passed}/{len(problems)}, broken ones failed "
              f"{rejected}/{len(problems)}")
    first = next(iter(verdicts.values()))
    differ = sorted({key for judged in verdicts.values() for key in judged if judged[key] != first[key]})
    print("verdicts agree across modes" if not differ else f"verdicts differ on {differ}")
    sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()
