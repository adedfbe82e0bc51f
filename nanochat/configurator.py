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
closest setting. `--config FILE` applies overrides from a .py, .yaml/.yml or .json file.
"""

import ast
import difflib
import io
import math
import os
import sys
import tokenize
from dataclasses import dataclass

BOOLEANS = {"true": True, "1": True, "false": False, "0": False}


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
    comments = {tok.start[0]: tok.string.lstrip("#").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    settings, group = {}, "Settings"
    for node in ast.parse(source).body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            continue
        name = node.targets[0].id
        if name not in names or name in settings:
            continue  # not a setting, or a later reassignment (e.g. device_type autodetected)
        above = node.lineno - 1  # 1-based line number of the line above
        if above >= 1 and lines[above - 1].strip().startswith("#"):
            group = comments[above]  # a comment alone on its line
        help_text = comments.get(node.end_lineno, "") if node.end_lineno != above else ""
        settings[name] = Setting(name, names[name], group, help_text)
    return list(settings.values())


def parse_value(setting, text):
    """A value from the command line or a config file, typed like the setting's default."""
    default, text = setting.default, str(text).strip()
    if isinstance(default, bool):
        if text.lower() not in BOOLEANS:
            raise ConfigError(f"--{setting.name} expects true/false/1/0, got {text!r}")
        return BOOLEANS[text.lower()]
    if isinstance(default, (int, float)):
        try:  # 5e5, 524_288 and 20*524288 too, the way the defaults are written
            number = math.prod(float(factor) for factor in text.split("*"))
        except ValueError:
            number = None
        if isinstance(default, float) and number is not None:
            return float(number)
        if number is not None and float(number).is_integer():
            return int(number)
        raise ConfigError(f"--{setting.name} expects {'a number' if isinstance(default, float) else 'an integer'}, "
                          f"got {text!r}")
    return text


def lookup(name, by_name, where="command line"):
    """The setting called name, or an error that suggests the closest one."""
    if name in by_name:
        return by_name[name]
    suggestion = difflib.get_close_matches(name, list(by_name), n=1, cutoff=0.0)
    hint = f" Did you mean --{suggestion[0]}?" if suggestion else ""
    raise ConfigError(f"unknown setting {name!r} on the {where}.{hint} (--help lists them all)")


def load_config_file(path, by_name):
    """Overrides from a .py file (its top-level names) or a .yaml/.yml/.json file, typed like the defaults."""
    if not os.path.exists(path):
        raise ConfigError(f"config file {path!r} does not exist")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith(".py"):
        namespace = {}
        exec(compile(text, path, "exec"), namespace)
        raw = {k: v for k, v in namespace.items() if not k.startswith("_") and not callable(v)
               and not isinstance(v, type(os))}
    elif path.endswith((".yaml", ".yml", ".json")):
        import yaml  # JSON is YAML too
        raw = yaml.safe_load(text) or {}
    else:
        raise ConfigError(f"config file {path!r}: use a .py, .yaml, .yml or .json file")
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path!r} must hold a mapping of setting names to values")
    overrides = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        overrides[name] = parse_value(lookup(name, by_name, where=f"config file {path}"), value)
    return overrides


def parse_args(argv, settings):
    """
    Turn argv into {name: typed value}. Accepts --name=value, --name value, dashes or underscores,
    a bare --flag for booleans, and --config FILE (or a positional FILE) applied in order.
    Returns (overrides, wants_help).
    """
    by_name = {s.name: s for s in settings}
    overrides = {}
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg in ("-h", "--help"):
            return overrides, True
        if arg == "--":
            continue  # an end-of-options marker, e.g. from `torchrun -m scripts.base_train -- --depth=20`
        if not arg.startswith("--"):
            if not arg.endswith((".py", ".yaml", ".yml", ".json")):
                raise ConfigError(f"unexpected argument {arg!r}: settings are written --name=value (--help lists them)")
            arg = "--config=" + arg
        key, has_value, value = arg[2:].partition("=")
        name = key.replace("-", "_")
        setting = None if name == "config" else lookup(name, by_name)
        if not has_value:
            next_arg = args[0] if args else None
            if setting is not None and isinstance(setting.default, bool):
                # a bare flag means true, unless a boolean word follows
                value = args.pop(0) if next_arg is not None and next_arg.lower() in BOOLEANS else "true"
            elif next_arg is None or next_arg.startswith("--"):  # ("-1" is a value: it has one dash)
                raise ConfigError("--config needs a file name: --config FILE" if setting is None else
                                  f"--{name} needs a value: --{name}=VALUE (default {setting.default!r})")
            else:
                value = args.pop(0)
        if setting is None:
            overrides.update(load_config_file(value, by_name))
        else:
            overrides[name] = parse_value(setting, value)
    return overrides, False


def format_help(settings, script_name, description):
    shown = {s.name: f"--{s.name}={s.default!r}" if isinstance(s.default, str) else f"--{s.name}={s.default}"
             for s in settings}
    width = max(len(text) for text in shown.values()) + 2
    lines = [f"usage: python -m {script_name} [--config FILE] [--name=value ...]", ""]
    if description:
        lines += [description.strip(), ""]
    group = None
    for s in settings:
        if s.group != group:
            group = s.group
            lines += ["", group]
        lines.append(f"  {shown[s.name]:<{width}} {s.help}")
    lines += ["", "Names take dashes or underscores; booleans take true/false/1/0; "
                  "--config FILE reads .py/.yaml/.json overrides."]
    return "\n".join(lines)


def configure(namespace, script_path, argv=None):
    """
    Override the settings in `namespace` (a script's globals()) from the command line.
    Returns the final settings as a dict (useful to log with the run). Exits with a clear
    message on mistakes, and after printing the help for -h/--help.
    """
    names = {k: v for k, v in namespace.items() if not k.startswith("_") and isinstance(v, (int, float, bool, str))}
    settings = read_settings(script_path, names)
    try:
        overrides, wants_help = parse_args(sys.argv[1:] if argv is None else argv, settings)
    except ConfigError as e:
        raise SystemExit(f"error: {e}")
    if wants_help:
        module = namespace["__spec__"].name if namespace.get("__spec__") else os.path.basename(script_path)
        print(format_help(settings, module, namespace.get("__doc__") or ""))
        raise SystemExit(0)
    for name, value in overrides.items():
        if value != namespace[name] and int(os.environ.get("RANK", 0)) == 0:
            print(f"Setting {name} = {value!r} (default {namespace[name]!r})")
        namespace[name] = value
    return {s.name: namespace[s.name] for s in settings}
