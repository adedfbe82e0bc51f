"""The command-line settings parser: types from defaults, both spellings, errors that suggest, config files, help."""

import json
import textwrap

import pytest

from nanochat.configurator import ConfigError, configure, parse_args, read_settings

SCRIPT = textwrap.dedent('''
    """A toy script."""
    import os

    # Runtime: where it runs
    run = "dummy"  # wandb run name
    dry_run = False  # print and exit
    # Model: what is trained
    depth = 20  # number of layers
    max_seq_len = 2048  # context length
    # Optimisation
    matrix_lr = 0.02  # Muon learning rate
    eval_tokens = 20*524288  # tokens per evaluation
    settings = configure(globals(), __file__)
    depth = depth + 1  # a later reassignment is not a setting
''')


@pytest.fixture
def script(tmp_path):
    path = tmp_path / "toy_script.py"
    path.write_text(SCRIPT)
    namespace = {"run": "dummy", "dry_run": False, "depth": 20, "max_seq_len": 2048, "matrix_lr": 0.02,
                 "eval_tokens": 20 * 524288, "__doc__": "A toy script."}
    return str(path), namespace


def parse(script, argv):
    path, namespace = script
    settings = read_settings(path, {k: v for k, v in namespace.items() if not k.startswith("_")})
    overrides, wants_help = parse_args(argv, settings)
    return overrides


def test_reads_groups_comments_and_defaults(script):
    path, namespace = script
    settings = read_settings(path, {k: v for k, v in namespace.items() if not k.startswith("_")})
    assert [s.name for s in settings] == ["run", "dry_run", "depth", "max_seq_len", "matrix_lr", "eval_tokens"]
    assert [s.group for s in settings] == (["Runtime: where it runs"] * 2 + ["Model: what is trained"] * 2
                                           + ["Optimisation"] * 2)
    assert settings[2].help == "number of layers"
    assert settings[2].default == 20


def test_values_are_typed_from_the_defaults(script):
    overrides = parse(script, ["--depth=4", "--matrix_lr=1e-3", "--run=my run", "--dry_run=false", "--eval_tokens=5e5"])
    assert overrides == {"depth": 4, "matrix_lr": 0.001, "run": "my run", "dry_run": False, "eval_tokens": 500000}
    assert type(overrides["depth"]) is int and type(overrides["matrix_lr"]) is float
    # an int where a float is expected is fine; products written like the defaults too
    assert parse(script, ["--matrix_lr=1"]) == {"matrix_lr": 1.0}
    assert parse(script, ["--eval_tokens=4*1024"]) == {"eval_tokens": 4096}
    assert parse(script, ["--eval_tokens=524_288"]) == {"eval_tokens": 524288}


@pytest.mark.parametrize("text,value", [("true", True), ("1", True), ("True", True), ("false", False), ("0", False)])
def test_booleans(script, text, value):
    assert parse(script, [f"--dry_run={text}"]) == {"dry_run": value}


def test_both_spellings_and_separate_values(script):
    assert parse(script, ["--max-seq-len", "512", "--depth", "4"]) == {"max_seq_len": 512, "depth": 4}
    assert parse(script, ["--max_seq_len=512"]) == {"max_seq_len": 512}
    # a bare boolean flag means true; a boolean word after it is its value
    assert parse(script, ["--dry-run", "--depth=3"]) == {"dry_run": True, "depth": 3}
    assert parse(script, ["--dry_run", "0"]) == {"dry_run": False}
    # negative numbers are values, not flags
    assert parse(script, ["--depth", "-1"]) == {"depth": -1}
    # a bare "--" (end of options, as launchers pass it through) is ignored
    assert parse(script, ["--", "--depth=5"]) == {"depth": 5}


def test_later_arguments_win(script):
    assert parse(script, ["--depth=4", "--depth=6"]) == {"depth": 6}


def test_unknown_name_suggests_the_closest(script):
    with pytest.raises(ConfigError, match="Did you mean --max_seq_len"):
        parse(script, ["--max_seqlen=4"])
    with pytest.raises(ConfigError, match="Did you mean --depth"):
        parse(script, ["--dept", "4"])


@pytest.mark.parametrize("arg,message", [
    ("--depth=four", "expects an integer"),
    ("--depth=2.5", "expects an integer"),
    ("--matrix_lr=fast", "expects a number"),
    ("--dry_run=maybe", "expects true/false"),
])
def test_bad_values_name_the_setting(script, arg, message):
    with pytest.raises(ConfigError, match=message):
        parse(script, [arg])


def test_missing_value_is_an_error(script):
    with pytest.raises(ConfigError, match="needs a value"):
        parse(script, ["--depth"])


def test_config_files(script, tmp_path):
    py = tmp_path / "over.py"
    py.write_text("depth = 8\nmatrix_lr = 0.05\n")
    yml = tmp_path / "over.yaml"
    yml.write_text("max-seq-len: 256\ndry_run: true\n")
    js = tmp_path / "over.json"
    js.write_text(json.dumps({"run": "from json", "depth": 12}))
    assert parse(script, ["--config", str(py)]) == {"depth": 8, "matrix_lr": 0.05}
    assert parse(script, [f"--config={yml}"]) == {"max_seq_len": 256, "dry_run": True}
    # applied in order, so the command line can override a file and vice versa
    assert parse(script, [f"--config={js}", "--depth=2"]) == {"run": "from json", "depth": 2}
    assert parse(script, ["--depth=2", str(js)]) == {"run": "from json", "depth": 12}
    bad = tmp_path / "bad.yaml"
    bad.write_text("detph: 3\n")
    with pytest.raises(ConfigError, match="Did you mean --depth"):
        parse(script, ["--config", str(bad)])
    wrong_type = tmp_path / "wrong.json"
    wrong_type.write_text(json.dumps({"depth": "deep"}))
    with pytest.raises(ConfigError, match="expects an integer"):
        parse(script, ["--config", str(wrong_type)])
    with pytest.raises(ConfigError, match="does not exist"):
        parse(script, ["--config", str(tmp_path / "missing.yaml")])


def test_configure_updates_the_namespace_and_exits_on_errors(script, capsys):
    path, namespace = script
    config = configure(namespace, path, argv=["--depth=3"])
    assert namespace["depth"] == 3 and config["depth"] == 3 and config["run"] == "dummy"
    with pytest.raises(SystemExit, match="Did you mean --depth"):
        configure(namespace, path, argv=["--deep=3"])


def test_help_lists_groups_explanations_and_defaults(script, capsys):
    path, namespace = script
    with pytest.raises(SystemExit) as exit_info:
        configure(namespace, path, argv=["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "A toy script." in out
    for line in ["Runtime: where it runs", "Model: what is trained", "--depth=20", "number of layers",
                 "--run='dummy'", "--eval_tokens=10485760"]:
        assert line in out
    assert out.index("Runtime") < out.index("--run") < out.index("Model") < out.index("--depth")
    assert out.count("--depth=") == 1  # the later reassignment is not listed
