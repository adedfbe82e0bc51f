"""
Stopping a training run: a launcher's echo of Ctrl-C is not a second Ctrl-C, a real second one stops at
once, and CORE evaluation ends between tasks when a stop is requested.
"""

import os
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
    assert evaluate_core(model, CharTokenizer(), "cpu", bundle, should_stop=lambda: asked.append(1) or len(asked) > 2) is None
    assert len(asked) == 3  # asked before each task; the third answer was yes
    out = evaluate_core(model, CharTokenizer(), "cpu", bundle, should_stop=lambda: False)
    assert out["core_metric"] > 0
