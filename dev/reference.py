"""
The reference nanochat (karpathy/nanochat at f37d45c), loaded next to ours in one process for A/B
benchmarks: its modules are loaded under the names ref_<module>, and their `from nanochat.x import`
lines are pointed at ref_x, so nothing of ours is shadowed. Nothing here is needed to run nanochat.
"""

import importlib.util
import os
import sys
import types

import torch


def load_checkout(root, prefix, deps, names):
    """
    Modules `names` of another nanochat checkout at root, loaded as <prefix><name>; its `from nanochat.x
    import` and `from nanochat import x` lines are pointed at <prefix>x, and the modules `deps` are loaded first
    (those the checkout has: an older checkout of ours may lack a module a newer one split out).
    """
    def load(name):
        if f"{prefix}{name}" in sys.modules:
            return sys.modules[f"{prefix}{name}"]
        spec = importlib.util.spec_from_file_location(f"{prefix}{name}", os.path.join(root, "nanochat", f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[f"{prefix}{name}"] = module
        source = open(spec.origin, encoding="utf-8").read()
        for dep in set(deps) | set(names) | {"gpt", "checkpoint_manager"}:
            source = source.replace(f"from nanochat.{dep} import", f"from {prefix}{dep} import")
            source = source.replace(f"from nanochat import {dep}\n", f"import {prefix}{dep} as {dep}\n")
        exec(compile(source, spec.origin, "exec"), module.__dict__)
        return module

    deps = [dep for dep in deps if os.path.isfile(os.path.join(root, "nanochat", f"{dep}.py"))]
    for dep in deps:
        load(dep)
    return [load(name) for name in names]


def load_reference(ref_dir, *names):
    """The reference's modules `names` (e.g. "gpt", "engine", "core_eval"), with what they import."""
    if not ref_dir or not os.path.isfile(os.path.join(ref_dir, "nanochat", "gpt.py")):
        raise SystemExit(f"ref_dir={ref_dir!r} is not a checkout of the reference nanochat (no nanochat/gpt.py there): "
                         "pass the path of a clone of karpathy/nanochat at f37d45c, or leave it empty to skip it")
    sys.modules.setdefault("ref_checkpoint_manager", types.SimpleNamespace(load_model=None))  # only __main__ uses it
    return load_checkout(ref_dir, "ref_", ("common", "muon", "adamw"), names)


def reference_model(ref_gpt, model):
    """The reference's GPT with the same config and weights as our model (our state_dict loads into it)."""
    fields = ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd")
    with torch.device("meta"):
        ref_model = ref_gpt.GPT(ref_gpt.GPTConfig(**{k: getattr(model.config, k) for k in fields}))
    ref_model.to_empty(device=model.get_device())
    ref_model.init_weights()  # its rotary tables; the weights come next
    ref_model.load_state_dict(model.state_dict(), strict=True)
    return ref_model.eval()
