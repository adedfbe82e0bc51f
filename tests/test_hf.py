"""
The Hugging Face format (nanochat/hf_format.py, scripts/export_hf.py, scripts/import_hf.py): an exported folder
loads in transformers as it is and computes what our model computes (token ids, logits, greedy tokens,
chat template), import gives back the very same weights and tokenizer, and folders that do not fit are
refused in one line with nothing written. transformers is needed: runs/setup_env.sh installs it (the `hf`
extra), so in CI these tests run, never skip.
"""

import json
import math
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from nanochat.checkpoint_manager import load_checkpoint, load_model, save_checkpoint
from nanochat.engine import Engine
from nanochat.gpt import GPTConfig, build_gpt
from nanochat.report import Report
from nanochat.tokenizer import RustBPETokenizer, SPECIAL_TOKENS, get_tokenizer
from test_tokenizer import MIXED_SAMPLES, make_docs

try:
    import transformers  # noqa: F401
except ImportError:
    if os.environ.get("CI") == "true":
        raise
    pytest.skip("needs the hf extra (pip install -e '.[hf]'; runs/setup_env.sh installs it)", allow_module_level=True)
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from nanochat import hf_format  # noqa: E402
from nanochat.hf_format import FormatError, import_folder, read_folder, weight_names, write_folder  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# a small GPT with GQA and nanochat's head dimension of 64
CONFIG = dict(sequence_len=256, vocab_size=512, n_layer=2, n_head=2, n_kv_head=1, n_embd=128)
STEP = 7
# whitespace and scripts the split pattern treats differently, on top of test_tokenizer's samples
EDGE_TEXTS = [
    "\n", " ", "\t\t", "a\r\nb\rc\n\r", "  \n  \n", "end with spaces   ", "\u00a0\u00a0x", "x\u2028y\u2029z",
    "\x0b\x0c\x85", "zero\u200bwidth\u200djoin", "ﬁ ligature Ａ fullwidth", "١٢٣ ٤ 12345678", "Ⅻ ⅷ ² ³ ¼",
    "don't DON'T it's IT'S we've you'LL", "'s's's", "a1b22c333", "x" * 300, "🙂" * 5 + " 👨‍👩‍👧‍👦",
    "<|bos|>", "<|user_start|>hi<|user_end|>",
]


def run(module, *args, base_dir, env=None):
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "NANOCHAT_BASE_DIR": str(base_dir), **(env or {})})


def random_model(seed=0):
    """Our GPT with every matrix drawn at the init's scale (the init zeroes the output projections and the head)."""
    torch.manual_seed(seed)
    model = build_gpt(GPTConfig(**CONFIG))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "wte" not in name:
                param.normal_(0.0, 1.0 / math.sqrt(param.size(1)))
    return model.eval()


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A base dir with a tokenizer and an SFT checkpoint (random weights), and that model exported by the script."""
    root = tmp_path_factory.mktemp("hf")
    base_dir = root / "base"
    tokenizer = RustBPETokenizer.train_from_iterator(iter(make_docs(0, 300)), CONFIG["vocab_size"])
    tokenizer.save(str(base_dir / "tokenizer"))
    model = random_model()
    save_checkpoint(str(base_dir / "chatsft_checkpoints" / "d2"), STEP, model.state_dict(), None,
                    {"step": STEP, "model_config": CONFIG})
    out_dir = root / "export"
    result = run("scripts.export_hf", "-i", "sft", "-g", "d2", "-o", out_dir, base_dir=base_dir)
    assert result.returncode == 0, result.stderr
    return dict(base_dir=base_dir, out_dir=str(out_dir), tokenizer=tokenizer, model=model)


@pytest.fixture(scope="module")
def hf_model(source):
    return AutoModelForCausalLM.from_pretrained(source["out_dir"]).eval()


@pytest.fixture(scope="module")
def hf_tokenizer(source):
    return AutoTokenizer.from_pretrained(source["out_dir"])


def test_folder_has_what_transformers_needs(source):
    names = set(os.listdir(source["out_dir"]))
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "chat_template.jinja", "README.md", "nanochat.json"} <= names
    assert not [n for n in os.listdir(os.path.dirname(source["out_dir"])) if ".tmp-" in n]  # no leftovers
    config = json.load(open(os.path.join(source["out_dir"], "config.json")))
    assert config["model_type"] == "nanochat" and config["num_key_value_heads"] == 1
    assert "auto_map" not in config  # nothing that would need trust_remote_code


def test_tokenizer_ids_equal_ours(source, hf_tokenizer):
    ours = source["tokenizer"]
    texts = make_docs(1, 100) + MIXED_SAMPLES + EDGE_TEXTS
    for text in texts:
        ids = ours.encode(text)
        # special-token text inside a text: ours encodes it as plain text; transformers when told to
        split = "<|" in text
        assert hf_tokenizer(text, add_special_tokens=False, split_special_tokens=split)["input_ids"] == ids, text
        assert hf_tokenizer(text, split_special_tokens=split)["input_ids"] == [ours.get_bos_token_id()] + ids
        assert hf_tokenizer.decode(ids) == ours.decode(ids)
    assert hf_tokenizer("<|bos|>", add_special_tokens=False)["input_ids"] == [ours.get_bos_token_id()]
    for name in SPECIAL_TOKENS:
        assert hf_tokenizer.convert_tokens_to_ids(name) == ours.encode_special(name)


CONVERSATIONS = [
    [{"role": "user", "content": "What is 12*7?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi there"}],
    [{"role": "user", "content": "naïve café 🙂\n  two\tlines "}, {"role": "assistant", "content": "Sure: 42."},
     {"role": "user", "content": "And   then?"}],
    [{"role": "user", "content": [{"type": "text", "text": "parts "}, {"type": "text", "text": "joined"}]}],
    [{"role": "user", "content": "What is 12*7?"},
     {"role": "assistant", "content": [{"type": "text", "text": "Let me compute. "},
                                       {"type": "python", "text": "12*7"},
                                       {"type": "python_output", "text": "84"},
                                       {"type": "text", "text": " It is 84."}]},
     {"role": "user", "content": "thanks"}],
    [{"role": "user", "content": "q"}, {"role": "assistant", "content": "an answer that gets replaced"}],
]


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_chat_template_gives_our_rendering(source, hf_tokenizer, messages):
    ours = source["tokenizer"]
    as_ours = [{**m, "content": "".join(p["text"] for p in m["content"])} if m["role"] == "user"
               and isinstance(m["content"], list) else m for m in messages]
    prompt = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
    assert prompt == ours.render_for_completion({"messages": as_ours})
    if messages[-1]["role"] == "assistant":  # a whole conversation: the ids and the training mask
        rendered = hf_tokenizer.apply_chat_template(messages, return_assistant_tokens_mask=True)
        assert (rendered["input_ids"], rendered["assistant_masks"]) == ours.render_conversation({"messages": as_ours})


def test_chat_template_refuses_what_ours_refuses(hf_tokenizer):
    for messages in [[{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
                     [{"role": "system", "content": "s"}], [{"role": "tool", "content": "84"}]]:
        with pytest.raises(Exception, match="should be from|must be followed"):
            hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True)


def doc_ids(tokenizer, seed, length=160):
    """(2, length) ids of two documents, each starting with <|bos|>."""
    return torch.tensor([row[:length] for row in tokenizer.encode(make_docs(seed, 2, 150), prepend="<|bos|>")])


def test_logits_equal_ours(source, hf_model):
    model, tokenizer = source["model"], source["tokenizer"]
    ids = doc_ids(tokenizer, seed=2)
    with torch.no_grad():
        ours, theirs = model(ids), hf_model(ids).logits
    # our rotary tables are rounded through bf16 (as the reference's), transformers' are fp32
    assert (ours - theirs).abs().max() / ours.abs().max() < 1e-3
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


def test_logits_identical_with_exact_rotary_tables(source, hf_model):
    # the whole difference above is the tables: with transformers' own fp32 values in ours, not one bit differs
    model = random_model()
    positions = torch.arange(model.cos.size(1))[None]
    cos, sin = hf_model.model.rotary_emb(torch.zeros(1), positions)  # (1, T, head_dim), both halves alike
    half = cos.size(-1) // 2
    assert torch.equal(cos[..., :half], cos[..., half:])
    # ours are laid out [cos, cos] and [sin, -sin] per head (gpt.apply_rotary_emb)
    model.cos = cos[:, :, None, :].contiguous()
    model.sin = torch.cat([sin[..., :half], -sin[..., :half]], dim=-1)[:, :, None, :].contiguous()
    assert (model.cos - source["model"].cos).abs().max() > 0  # really other tables
    ids = doc_ids(source["tokenizer"], seed=3)
    with torch.no_grad():
        assert (model(ids) - hf_model(ids).logits).abs().max().item() == 0.0


def test_greedy_generate_equals_engine(source, hf_model, hf_tokenizer):
    tokenizer = source["tokenizer"]
    python_start = tokenizer.encode_special("<|python_start|>")
    prompts = [tokenizer.render_for_completion({"messages": [{"role": "user", "content": "Tell me about rivers."}]}),
               tokenizer.encode("the river and the light", prepend="<|bos|>")]
    for prompt in prompts:
        (ours,), _ = Engine(source["model"], tokenizer).generate_batch(prompt, max_tokens=40, temperature=0.0)
        out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False)[0].tolist()
        enders = set(hf_model.generation_config.eos_token_id)
        theirs = list(prompt)  # and the generated tokens up to (not including) an ender, as generate_batch gives
        for token in out[len(prompt):]:
            if token in enders:
                break
            theirs.append(token)
        assert python_start not in ours[len(prompt):]  # no calculator call: the Engine forces no tokens
        assert len(ours) > len(prompt) + 5 and theirs == ours


def test_round_trip_gives_the_same_weights_and_tokenizer(source, tmp_path, monkeypatch):
    base_dir = tmp_path / "imported"
    result = run("scripts.import_hf", source["out_dir"], base_dir=base_dir)
    assert result.returncode == 0, result.stderr
    assert "-i sft -g d2" in result.stdout  # what it was filed under, as exported
    original, _, _ = load_checkpoint(str(source["base_dir"] / "chatsft_checkpoints" / "d2"), STEP, "cpu")
    imported, _, meta = load_checkpoint(str(base_dir / "chatsft_checkpoints" / "d2"), STEP, "cpu")
    assert original.keys() == imported.keys()
    for name in original:
        assert original[name].dtype == imported[name].dtype and torch.equal(original[name], imported[name]), name
    assert meta["model_config"] == CONFIG and meta["imported_from"]["step"] == STEP
    for name in ["tokenizer.pkl", "token_bytes.pt"]:  # the very same files
        assert (base_dir / "tokenizer" / name).read_bytes() == (source["base_dir"] / "tokenizer" / name).read_bytes()
    # and what every script loads through works on it: the same generations as the original model
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base_dir))
    model, tokenizer, _ = load_model("sft", "cpu", phase="eval")
    texts = make_docs(4, 20) + EDGE_TEXTS
    assert tokenizer.encode(texts) == source["tokenizer"].encode(texts)
    prompt = tokenizer.encode("the river", prepend="<|bos|>")
    assert (Engine(model, tokenizer).generate_batch(prompt, max_tokens=10, temperature=0.0)
            == Engine(source["model"], source["tokenizer"]).generate_batch(prompt, max_tokens=10, temperature=0.0))


def test_sharded_bf16_and_mlx_folders(source, tmp_path, monkeypatch):
    model_data = source["model"].state_dict()
    info = {"phase": "base", "model_tag": "d2", "step": STEP}

    def export(name, **kwargs):
        return write_folder(str(tmp_path / name), model_data, CONFIG, source["tokenizer"], info,
                            card=lambda n: f"card {n}", **kwargs)

    # sharded: transformers' own index and shards, loading as one model
    sharded = export("sharded", max_shard_size="300KB")
    shards = [n for n in os.listdir(sharded) if n.startswith("model-") and n.endswith(".safetensors")]
    assert len(shards) > 2 and "model.safetensors.index.json" in os.listdir(sharded)
    hf = AutoModelForCausalLM.from_pretrained(sharded)
    names = weight_names(CONFIG["n_layer"])
    for ours, theirs in names.items():
        assert torch.equal(hf.state_dict()[theirs], model_data[ours])
    # bf16: half the size, transformers loads it in bf16
    bf16 = export("bf16", dtype=torch.bfloat16)
    hf = AutoModelForCausalLM.from_pretrained(bf16)
    assert hf.dtype == torch.bfloat16 and torch.equal(hf.lm_head.weight, model_data["lm_head.weight"].bfloat16())
    # mlx-lm's nanochat model reads our own names
    mlx = export("mlx", mlx=True)
    from safetensors.torch import load_file
    assert set(load_file(os.path.join(mlx, "model.safetensors"))) == set(model_data)
    # all three import back (as base models of their own tags)
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    for folder, tag in [(sharded, "sharded"), (bf16, "bf16"), (mlx, "mlx")]:
        assert import_folder(folder, model_tag=tag) == ("base", tag, STEP)
        imported, _, _ = load_checkpoint(str(tmp_path / "base" / "base_checkpoints" / tag), STEP, "cpu")
        cast = torch.bfloat16 if tag == "bf16" else torch.float32
        assert all(torch.equal(imported[k], v.to(cast)) for k, v in model_data.items())


def test_export_replaces_a_folder_only_when_told_and_leaves_nothing_on_failure(source, tmp_path, monkeypatch):
    model_data = source["model"].state_dict()
    out = tmp_path / "out"
    args = (str(out), model_data, CONFIG, source["tokenizer"], {"phase": "sft", "model_tag": "d2", "step": 1})
    write_folder(*args, card=lambda n: "first")
    with pytest.raises(FileExistsError, match="--force"):
        write_folder(*args, card=lambda n: "second")

    def broken(*a, **k):
        raise RuntimeError("disk full")
    monkeypatch.setattr(hf_format, "hf_tokenizer", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        write_folder(*args, card=lambda n: "second", overwrite=True)
    assert os.listdir(tmp_path) == ["out"] and (out / "README.md").read_text() == "first"  # the old one, whole
    monkeypatch.undo()
    write_folder(*args, card=lambda n: "second", overwrite=True)
    assert os.listdir(tmp_path) == ["out"] and (out / "README.md").read_text() == "second"


def test_export_without_the_extra_says_how_to_get_it(source, tmp_path):
    blocker = tmp_path / "blocker" / "transformers"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'transformers'\", "
                                         "name='transformers')\n")
    result = run("scripts.export_hf", "-o", tmp_path / "out", base_dir=source["base_dir"],
                 env={"PYTHONPATH": str(blocker.parent)})
    assert result.returncode != 0 and not (tmp_path / "out").exists()
    assert result.stderr.strip().splitlines() == ["export_hf: the Hugging Face format needs the 'transformers' "
                                                  "package: install the Hugging Face extra: pip install -e '.[hf]'"]


def test_model_card_has_the_reports_figures(source, tmp_path):
    base_dir = tmp_path / "base"
    shutil.copytree(source["base_dir"], base_dir)
    report = Report(str(base_dir / "report"))
    report.log("Base model training", [{"model_tag": "d2"}, {"Number of training tokens": 123456789}])
    report.log("Base model loss", {"val bpb": 0.8123})
    report.log("Base model evaluation", {"CORE metric": 0.2219})
    report.log("Chat evaluation sft", {"ChatCORE": 0.3051})
    result = run("scripts.export_hf", "-g", "d2", "-o", tmp_path / "out", base_dir=base_dir)
    assert result.returncode == 0, result.stderr
    card = (tmp_path / "out" / "README.md").read_text()
    for figure in ["123,456,789", "0.8123", "0.2219", "0.3051", "2 layers, width 128", "cannot tell whether stand-ins",
                   'pipeline("text-generation"', "no `tool` role"]:
        assert figure in card
    # a report of another model gives no figures, and says so
    report.log("Base model training", [{"model_tag": "d12"}, {"Number of training tokens": 5}])
    figures, note = hf_format.read_report(str(base_dir), "d2", "sft")
    assert figures == {} and "is of model d12, not d2" in note


def damage(folder, what):
    """Make an exported folder unfit in one way."""
    config_path = os.path.join(folder, "config.json")
    config = json.load(open(config_path))
    if what == "other model_type":
        config["model_type"] = "llama"
    elif what == "shapes":
        config["hidden_size"] = 64
        config["intermediate_size"] = 256
    elif what == "invalid config":
        config["hidden_size"] = "wide"
    elif what == "not relu2":
        config["hidden_act"] = "silu"
    elif what == "no weights":
        os.remove(os.path.join(folder, "model.safetensors"))
    elif what == "no config":
        os.remove(config_path)
    elif what == "damaged weights":
        with open(os.path.join(folder, "model.safetensors"), "r+b") as f:
            f.write(b"\xff" * 16)
    elif what == "missing tensor":
        from safetensors.torch import load_file, save_file
        path = os.path.join(folder, "model.safetensors")
        weights = load_file(path)
        del weights["model.layers.1.mlp.fc2.weight"]
        save_file(weights, path)
    elif what == "other tokenizer":
        path = os.path.join(folder, "tokenizer.json")
        tokenizer = json.load(open(path))
        tokenizer["added_tokens"] = tokenizer["added_tokens"][:3]
        json.dump(tokenizer, open(path, "w"))
    if what not in ("no config",):
        json.dump(config, open(config_path, "w"))


REFUSALS = {
    "other model_type": "model_type 'llama', not 'nanochat'",
    "shapes": "has shape (512, 128) but config.json implies (512, 64)",
    "invalid config": "not a valid NanoChatConfig (Validation error for field 'hidden_size'",
    "not relu2": "hidden_act='silu' but nanochat's GPT has 'relu2'",
    "no weights": "has no model.safetensors",
    "no config": "has no config.json",
    "damaged weights": "cannot be read as safetensors",
    "missing tensor": "lack 1 tensors that config.json implies, e.g. model.layers.1.mlp.fc2.weight",
    "other tokenizer": "special tokens are",
}


@pytest.mark.parametrize("what", REFUSALS)
def test_import_refuses_a_folder_that_does_not_fit(source, tmp_path, monkeypatch, what):
    folder = tmp_path / "folder"
    shutil.copytree(source["out_dir"], folder)
    damage(str(folder), what)
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    with pytest.raises(FormatError, match=re.escape(REFUSALS[what])) as error:
        import_folder(str(folder))
    assert "\n" not in str(error.value)
    assert not (tmp_path / "base").exists()  # nothing written


def test_import_script_refuses_in_one_line(source, tmp_path):
    result = run("scripts.import_hf", tmp_path / "nowhere", base_dir=tmp_path / "base")
    assert result.returncode != 0 and not (tmp_path / "base").exists()
    assert result.stderr.strip().splitlines() == [f"import_hf: {tmp_path / 'nowhere'} is not a folder"]


def test_import_keeps_a_different_tokenizer_unless_told(source, tmp_path, monkeypatch):
    base_dir = tmp_path / "base"
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base_dir))
    other = RustBPETokenizer.train_from_iterator(iter(make_docs(9, 300)), CONFIG["vocab_size"])
    other.save(str(base_dir / "tokenizer"))
    with pytest.raises(FileExistsError, match="different tokenizer.*--replace-tokenizer"):
        import_folder(source["out_dir"])
    assert not (base_dir / "chatsft_checkpoints").exists()
    assert get_tokenizer().encode("the river") == other.encode("the river")
    import_folder(source["out_dir"], replace_tokenizer=True)
    assert get_tokenizer().encode(make_docs(5, 5)) == source["tokenizer"].encode(make_docs(5, 5))
    # the same tokenizer already there is fine; a step already there is not overwritten
    import_folder(source["out_dir"], model_tag="again")
    with pytest.raises(FileExistsError, match="already has a checkpoint of step 7"):
        import_folder(source["out_dir"])


def test_read_folder_maps_names_back(source):
    weights, model_config, tokenizer, info = read_folder(source["out_dir"])
    assert model_config == CONFIG and info["phase"] == "sft" and info["step"] == STEP
    assert set(weights) == set(source["model"].state_dict())


def test_bench_hf_measures_at_toy_size(tmp_path):
    # dev/bench_hf.py end to end on generated words and a depth-1 model (its figures are not checked, only produced)
    result = subprocess.run([sys.executable, "-m", "dev.bench_hf", "--depths=1", "--gen_depths=1", "--vocab_size=600",
                             "--corpus_dir=", "--sequence_len=64", "--gen_tokens=4", "--prompt_tokens=8", "--repeats=1",
                             "--threads=1"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "NANOCHAT_BASE_DIR": str(tmp_path)})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    for line in ["weights bit-identical: True", "HF ids equal ours on 100 of 100", "same tokens: True", "HF tok/s"]:
        assert line in result.stdout
