"""
Command-line settings for the scripts, without argparse boilerplate.

A script declares its settings as plain module-level values at the top, grouped under one-line
comment headers, each with a short trailing comment saying why it exists:

    # Model: what gets trained
    depth = 20  # the one dial: width, heads and training length follow from it
    ...
    user_config = configure(globals(), __file__)

configure() reads that block back from the script's source, so `--help` prints the groups, the
comments and the defaults, and `--name=value` / `--name value` (dashes or underscores) override the
values in the script's globals. Types come from the defaults; mistakes are errors that name the
closest setting. `--config FILE` applies overrides from a .py, .yaml/.yml or .json file first.
"""

import ast
import difflib
import io
import json
import os
import sys
import tokenize
from dataclasses import dataclass


class ConfigError(ValueError):
    """A setting given on the command line or in a config file that cannot be used."""


@dataclass
class Setting:
    name: str
    default: object
    group: str
    help: str


def read_settings(script_path, names):
    """
    Settings declared in a script, in source order: module-level `name = value  # why` lines
    for the given names. A standalone comment line directly above a setting starts a new group
    ("# Title: description").
    """
    with open(script_path, encoding="utf-8") as f:
        source = f.read()
    lines = source.splitlines()
    # trailing comments by line number (tokenize knows which '#' are inside strings)
    comments = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    settings = []
    seen = set()
    group = "Settings"
    for node in ast.parse(source).body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            continue
        name = node.targets[0].id
        if name not in names or name in seen:
            continue  # not a setting, or a later reassignment (e.g. device_type autodetected)
        seen.add(name)
        above = node.lineno - 1  # 1-based line number of the line above
        if above >= 1 and lines[above - 1].strip().startswith("#"):
            group = comments[above]  # a comment alone on its line
        help_text = comments[node.end_lineno] if node.end_lineno in comments and node.end_lineno != above else ""
        settings.append(Setting(name, names[name], group, help_text))
    return settings


def parse_value(setting, text):
    """Convert a command-line string to the type of the setting's default."""
    default = setting.default
    text = text.strip() if isinstance(text, str) else text
    if not isinstance(text, str):  # from a yaml/json/python config file: already typed
        value = text
        if isinstance(default, bool) and isinstance(value, bool):
            return value
        if isinstance(default, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(default, int) and not isinstance(default, bool) and isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(default, str) and isinstance(value, str):
            return value
        text = str(value)
    if isinstance(default, bool):
        lowered = text.lower()
        if lowered in ("true", "1", "yes", "on"):
            return True
        if lowered in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"--{setting.name} expects true/false/1/0, got {text!r}")
    if isinstance(default, int):
        try:
            return int(text)  # also takes 524_288
        except ValueError:
            pass
        try:  # allow 5e5 or 20*524288 style integers
            number = float(text) if "*" not in text else _eval_product(text)
        except ValueError:
            number = None
        if number is not None and float(number).is_integer():
            return int(number)
        raise ConfigError(f"--{setting.name} expects an integer, got {text!r}")
    if isinstance(default, float):
        try:
            return float(text) if "*" not in text else float(_eval_product(text))
        except ValueError:
            raise ConfigError(f"--{setting.name} expects a number, got {text!r}") from None
    return text


def _eval_product(text):
    """'20*524288' -> 10485760.0, so big token counts can be written the way the defaults are."""
    result = 1.0
    for factor in text.split("*"):
        result *= float(factor)
    return result


def closest_setting(name, settings):
    names = [s.name for s in settings]
    match = difflib.get_close_matches(name, names, n=1, cutoff=0.0)
    return match[0] if match else None


def _unknown(name, settings, where="command line"):
    suggestion = closest_setting(name, settings)
    hint = f" Did you mean --{suggestion}?" if suggestion else ""
    return ConfigError(f"unknown setting {name!r} on the {where}.{hint} (--help lists them all)")


def load_config_file(path, settings):
    """Overrides from a .py (its top-level names), .yaml/.yml or .json file, typed like the defaults."""
    if not os.path.exists(path):
        raise ConfigError(f"config file {path!r} does not exist")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith(".py"):
        namespace = {}
        exec(compile(text, path, "exec"), namespace)
        raw = {k: v for k, v in namespace.items() if not k.startswith("_") and not callable(v) and not isinstance(v, type(os))}
    elif path.endswith((".yaml", ".yml")):
        import yaml
        raw = yaml.safe_load(text) or {}
    elif path.endswith(".json"):
        raw = json.loads(text)
    else:
        raise ConfigError(f"config file {path!r}: use a .py, .yaml, .yml or .json file")
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path!r} must hold a mapping of setting names to values")
    by_name = {s.name: s for s in settings}
    overrides = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in by_name:
            raise _unknown(name, settings, where=f"config file {path}")
        overrides[name] = parse_value(by_name[name], value)
    return overrides


def parse_args(argv, settings):
    """
    Turn argv into {name: typed value}. Accepts --name=value, --name value, dashes or underscores,
    a bare --flag for booleans, and --config FILE (or a positional FILE) applied in order.
    Returns (overrides, wants_help).
    """
    by_name = {s.name: s for s in settings}
    overrides = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg in ("-h", "--help"):
            return overrides, True
        if arg == "--":
            continue  # an end-of-options marker, e.g. from `torchrun -m scripts.base_train -- --depth=20`
        if not arg.startswith("--"):
            if arg.endswith((".py", ".yaml", ".yml", ".json")):
                overrides.update(load_config_file(arg, settings))
                continue
            raise ConfigError(f"unexpected argument {arg!r}: settings are written --name=value (--help lists them)")
        key, has_value, value = arg[2:].partition("=")
        name = key.replace("-", "_")
        if name == "config":
            if not has_value:
                if i >= len(argv):
                    raise ConfigError("--config needs a file name: --config FILE")
                value = argv[i]
                i += 1
            overrides.update(load_config_file(value, settings))
            continue
        if name not in by_name:
            raise _unknown(name, settings)
        setting = by_name[name]
        if not has_value:
            next_arg = argv[i] if i < len(argv) else None
            if isinstance(setting.default, bool):
                # a bare flag means true, unless a boolean word follows
                if next_arg is not None and next_arg.lower() in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                    value = next_arg
                    i += 1
                else:
                    value = "true"
            else:
                if next_arg is None or (next_arg.startswith("--") and not _looks_negative_number(next_arg)):
                    raise ConfigError(f"--{name} needs a value: --{name}=VALUE (default {setting.default!r})")
                value = next_arg
                i += 1
        overrides[name] = parse_value(setting, value)
    return overrides, False


def _looks_negative_number(text):
    try:
        float(text)
        return True
    except ValueError:
        return False


def format_help(settings, script_name, description=""):
    lines = [f"usage: python -m {script_name} [--config FILE] [--name=value ...]", ""]
    if description:
        lines += [description.strip(), ""]
    shown = {s.name: f"--{s.name}={s.default!r}" if isinstance(s.default, str) else f"--{s.name}={s.default}" for s in settings}
    width = max(len(text) for text in shown.values()) + 2
    group = None
    for s in settings:
        if s.group != group:
            group = s.group
            lines += ["", group]
        lines.append(f"  {shown[s.name]:<{width}} {s.help}")
    lines += ["", "Names take dashes or underscores; booleans take true/false/1/0; --config FILE reads .py/.yaml/.json overrides."]
    return "\n".join(lines)


def configure(namespace, script_path, argv=None, description=None):
    """
    Override the settings in `namespace` (a script's globals()) from the command line.
    Returns the final settings as a dict (useful to log with the run). Exits with a clear
    message on mistakes, and after printing the help for -h/--help.
    """
    argv = sys.argv[1:] if argv is None else argv
    names = {k: v for k, v in namespace.items()
             if not k.startswith("_") and isinstance(v, (int, float, bool, str))}
    settings = read_settings(script_path, names)
    module = namespace.get("__spec__").name if namespace.get("__spec__") else os.path.basename(script_path)
    try:
        overrides, wants_help = parse_args(argv, settings)
    except ConfigError as e:
        raise SystemExit(f"error: {e}")
    if wants_help:
        doc = description if description is not None else (namespace.get("__doc__") or "")
        print(format_help(settings, module, doc))
        raise SystemExit(0)
    rank0 = int(os.environ.get("RANK", 0)) == 0
    for name, value in overrides.items():
        if value != namespace[name] and rank0:
            print(f"Setting {name} = {value!r} (default {namespace[name]!r})")
        namespace[name] = value
    return {s.name: namespace[s.name] for s in settings}


def batch_size_suggestions(total_batch_size, device_batch_size, max_seq_len, world_size):
    """
    Explain why total_batch_size is not a whole number of micro-batches and propose the nearest
    values that are: total batch sizes around it, and device batch sizes that divide it.
    """
    micro = device_batch_size * max_seq_len * world_size
    lower = (total_batch_size // micro) * micro
    upper = lower + micro
    totals = [t for t in (lower, upper) if t > 0]
    msg = (f"total_batch_size={total_batch_size:,} is not a whole number of micro-batches: "
           f"device_batch_size x max_seq_len x world_size = {device_batch_size} x {max_seq_len} x {world_size} = {micro:,} tokens.\n"
           f"  nearest valid --total_batch_size: {', '.join(f'{t}' for t in totals)}")
    per_rank_rows, rem = divmod(total_batch_size, max_seq_len * world_size)
    if rem == 0:
        divisors = [d for d in range(1, per_rank_rows + 1) if per_rank_rows % d == 0]
        # the divisors closest to what was asked
        divisors = sorted(divisors, key=lambda d: (abs(d - device_batch_size), d))[:4]
        msg += f"\n  or a --device_batch_size that divides it: {', '.join(str(d) for d in sorted(divisors))}"
    else:
        msg += (f"\n  (no device_batch_size works: {total_batch_size:,} is not a multiple of "
                f"max_seq_len x world_size = {max_seq_len * world_size:,})")
    return msg
