"""
The Hugging Face format: a folder that `transformers` loads with AutoModelForCausalLM and AutoTokenizer
(its NanoChatForCausalLM, model_type "nanochat"), written from a checkpoint of ours and read back into one.

    config.json              NanoChatConfig: our GPTConfig under transformers' names
    generation_config.json   stop tokens (<|assistant_end|>, <|bos|>), the chat scripts' sampling defaults
    model.safetensors        the weights, renamed (WEIGHT_NAMES); sharded with an index when large
    tokenizer.json           our BPE ranks, split pattern and special tokens as a fast tokenizer
    tokenizer_config.json    its special tokens, <|bos|> prepended to every text, and the chat template
    chat_template.jinja      render_conversation's layout (CHAT_TEMPLATE below)
    nanochat.json            where the model came from (phase, model tag, step, GPTConfig): import reads it
    README.md                the model card

Needs the optional `hf` extra (transformers, safetensors): require_hf() says so in one line.
"""

import json
import os
import re
import shutil
import uuid

import torch

from nanochat.tokenizer import ENCODING_NAME, SPECIAL_TOKENS

HF_EXTRA_HINT = "install the Hugging Face extra: pip install -e '.[hf]'"
NANOCHAT_FILE = "nanochat.json"
NANOCHAT_FORMAT = 1  # version of nanochat.json's layout
SOFTCAP = 15.0  # our GPT's logit soft-cap (gpt.py)
ROPE_THETA = 10000.0  # our GPT's rotary base (gpt.py)
CHAT_SAMPLING = {"temperature": 0.6, "top_k": 50}  # the chat scripts' defaults (chat_cli, chat_web)

# our state_dict name -> transformers' NanoChatForCausalLM name; {i} is the layer index
WEIGHT_NAMES = {
    "transformer.wte.weight": "model.embed_tokens.weight",
    "transformer.h.{i}.attn.c_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "transformer.h.{i}.attn.c_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "transformer.h.{i}.attn.c_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "transformer.h.{i}.attn.c_proj.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "transformer.h.{i}.mlp.c_fc.weight": "model.layers.{i}.mlp.fc1.weight",
    "transformer.h.{i}.mlp.c_proj.weight": "model.layers.{i}.mlp.fc2.weight",
    "lm_head.weight": "lm_head.weight",
}

# render_conversation as a chat template: <|bos|>, a leading system message merged into the first user
# message, then <|user_start|>..<|user_end|> and <|assistant_start|>..<|assistant_end|> turns. An
# assistant message may also be a list of parts: text, python (the model's calculator call, between
# <|python_start|> and <|python_end|>) and python_output (the tool's answer, between <|output_start|> and
# <|output_end|>). With add_generation_prompt, a final assistant message is left out (as
# render_for_completion does) and <|assistant_start|> ends the prompt. {% generation %} marks what the
# model learns to write (render_conversation's mask), for return_assistant_tokens_mask.
CHAT_TEMPLATE = """\
{%- if not messages -%}{{ raise_exception('a conversation needs at least one message') }}{%- endif -%}
{%- set offset = 1 if messages[0]['role'] == 'system' else 0 -%}
{%- if offset == 1 and (messages|length < 2 or messages[1]['role'] != 'user') -%}
{{ raise_exception('a system message must be followed by a user message') }}
{%- endif -%}
{{- bos_token -}}
{%- for message in messages -%}
{%- set i = loop.index0 -%}
{%- if i >= offset and not (add_generation_prompt and loop.last and message['role'] == 'assistant') -%}
{%- set expected = 'user' if (i - offset) % 2 == 0 else 'assistant' -%}
{%- if message['role'] != expected -%}
{{ raise_exception('message ' ~ i ~ ' is from ' ~ message['role'] ~ ' but should be from ' ~ expected
                   ~ ' (turns alternate user, assistant; a system message may come first; there is no tool role)') }}
{%- endif -%}
{%- if message['role'] == 'user' -%}
{%- if message['content'] is string -%}
{%- set content = message['content'] -%}
{%- else -%}
{%- set ns = namespace(text='') -%}
{%- for part in message['content'] -%}
{%- if part['type'] != 'text' -%}{{ raise_exception('user content parts must be text') }}{%- endif -%}
{%- set ns.text = ns.text ~ part['text'] -%}
{%- endfor -%}
{%- set content = ns.text -%}
{%- endif -%}
{%- if i == 1 and offset == 1 -%}{%- set content = messages[0]['content'] ~ '\\n\\n' ~ content -%}{%- endif -%}
{{- '<|user_start|>' ~ content ~ '<|user_end|>' -}}
{%- else -%}
{{- '<|assistant_start|>' -}}
{%- if message['content'] is string -%}
{%- generation -%}{{- message['content'] -}}{%- endgeneration -%}
{%- else -%}
{%- for part in message['content'] -%}
{%- if part['type'] == 'text' -%}
{%- generation -%}{{- part['text'] -}}{%- endgeneration -%}
{%- elif part['type'] == 'python' -%}
{%- generation -%}{{- '<|python_start|>' ~ part['text'] ~ '<|python_end|>' -}}{%- endgeneration -%}
{%- elif part['type'] == 'python_output' -%}
{{- '<|output_start|>' ~ part['text'] ~ '<|output_end|>' -}}
{%- else -%}
{{ raise_exception('assistant content parts are text, python or python_output, not ' ~ part['type']) }}
{%- endif -%}
{%- endfor -%}
{%- endif -%}
{%- generation -%}{{- '<|assistant_end|>' -}}{%- endgeneration -%}
{%- endif -%}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|assistant_start|>' -}}{%- endif -%}
"""


class FormatError(ValueError):
    """A folder that is not a nanochat model in this format, or a model this format cannot hold; one line."""


def require_hf():
    """Import the optional packages this module needs, or raise ImportError with one line saying how to get them."""
    try:
        import safetensors  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        raise ImportError(f"the Hugging Face format needs the '{e.name}' package: {HF_EXTRA_HINT}") from None


def weight_names(n_layer):
    """{our state_dict name: transformers' name} for a model of n_layer blocks."""
    names = {}
    for ours, theirs in WEIGHT_NAMES.items():
        layers = range(n_layer) if "{i}" in ours else [None]
        names.update({ours.format(i=i): theirs.format(i=i) for i in layers})
    return names


def special_ids(tokenizer):
    return {name: tokenizer.encode_special(name) for name in SPECIAL_TOKENS}


# -----------------------------------------------------------------------------
# Config

def hf_config(model_config, tokenizer, dtype):
    """transformers' NanoChatConfig fields for our GPTConfig (a dict) and tokenizer; dtype as a string."""
    ids = special_ids(tokenizer)
    return dict(
        vocab_size=model_config["vocab_size"],
        hidden_size=model_config["n_embd"],
        intermediate_size=4 * model_config["n_embd"],
        num_hidden_layers=model_config["n_layer"],
        num_attention_heads=model_config["n_head"],
        num_key_value_heads=model_config["n_kv_head"],
        max_position_embeddings=model_config["sequence_len"],
        hidden_act="relu2",
        # F.rms_norm without eps uses the dtype's epsilon; transformers normalizes in fp32
        rms_norm_eps=torch.finfo(torch.float32).eps,
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
        final_logit_softcapping=SOFTCAP,
        attention_bias=False,
        tie_word_embeddings=False,
        bos_token_id=ids["<|bos|>"],
        eos_token_id=[ids["<|assistant_end|>"], ids["<|bos|>"]],
        pad_token_id=ids["<|bos|>"],
        dtype=dtype,
    )


def our_config(config, nanochat_info):
    """
    GPTConfig kwargs from a config.json dict, read as transformers reads it (its defaults fill what is
    absent); FormatError naming the first field that our GPT cannot follow.
    """
    from transformers import NanoChatConfig

    if config.get("model_type") != "nanochat":
        raise FormatError(f"config.json has model_type {config.get('model_type')!r}, not 'nanochat'")
    try:
        hf = NanoChatConfig.from_dict(config)
    except Exception as e:  # transformers' validation: type errors, impossible values
        raise FormatError(f"config.json is not a valid NanoChatConfig ({' '.join(str(e).split())})") from None
    for key in ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads"]:
        if not (isinstance(getattr(hf, key), int) and getattr(hf, key) > 0):
            raise FormatError(f"config.json has {key}={getattr(hf, key)!r}, not a positive integer")
    hidden, heads, kv_heads = hf.hidden_size, hf.num_attention_heads, hf.num_key_value_heads
    if hidden % heads or heads % kv_heads:
        raise FormatError(f"config.json's hidden_size {hidden}, num_attention_heads {heads} and num_key_value_heads "
                          f"{kv_heads} do not divide evenly")
    rope = hf.rope_parameters or {}
    # what our GPT hard-codes: each must hold, or the imported model would compute something else
    checks = [
        ("intermediate_size", hf.intermediate_size, 4 * hidden),
        ("hidden_act", hf.hidden_act, "relu2"),
        ("final_logit_softcapping", hf.final_logit_softcapping, SOFTCAP),
        ("attention_bias", hf.attention_bias, False),
        ("tie_word_embeddings", hf.tie_word_embeddings, False),
        ("rope_type", rope.get("rope_type"), "default"),
        ("rope_theta", rope.get("rope_theta"), ROPE_THETA),
        ("head_dim", getattr(hf, "head_dim", None) or hidden // heads, hidden // heads),
    ]
    for key, value, ours in checks:
        if value != ours:
            raise FormatError(f"config.json has {key}={value!r} but nanochat's GPT has {ours!r}")
    sequence_len = (nanochat_info or {}).get("model_config", {}).get("sequence_len")
    return dict(sequence_len=sequence_len or hf.max_position_embeddings, vocab_size=hf.vocab_size,
                n_layer=hf.num_hidden_layers, n_head=heads, n_kv_head=kv_heads, n_embd=hidden)


# -----------------------------------------------------------------------------
# Tokenizer

def hf_tokenizer(tokenizer, model_max_length):
    """Our tiktoken encoding as a transformers fast tokenizer, converted by transformers' own TikTokenConverter."""
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    enc = tokenizer.enc

    class RanksConverter(TikTokenConverter):
        def load_tiktoken_bpe(self, _):  # the ranks we hold, rather than a file tiktoken would cache in /tmp
            return enc._mergeable_ranks

    backend = RanksConverter(pattern=enc._pat_str, extra_special_tokens=enc._special_tokens).converted()
    ours = special_ids(tokenizer)
    if (theirs := {name: backend.token_to_id(name) for name in ours}) != ours:
        raise RuntimeError(f"the converted tokenizer numbers the special tokens {theirs}, ours are {ours}")
    # <|bos|> starts every document in pretraining, so plain text gets it too (add_special_tokens=False: not)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|bos|>", eos_token="<|assistant_end|>",
                                   pad_token="<|bos|>", add_bos_token=True, chat_template=CHAT_TEMPLATE,
                                   model_max_length=model_max_length, clean_up_tokenization_spaces=False)


def tokenizer_from_json(path):
    """A RustBPETokenizer rebuilt from a tokenizer.json in the layout hf_tokenizer writes; FormatError otherwise."""
    import tiktoken
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    from nanochat.tokenizer import RustBPETokenizer

    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    model, pre = data.get("model") or {}, data.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    if (model.get("type") != "BPE" or len(steps) != 2 or steps[0].get("type") != "Split"
            or steps[1].get("type") != "ByteLevel" or "Regex" not in steps[0].get("pattern", {})):
        raise FormatError("tokenizer.json is not a byte-level BPE with a split pattern (a tiktoken-style tokenizer)")
    byte_of = {char: byte for byte, char in bytes_to_unicode().items()}
    try:
        ranks = {bytes(byte_of[char] for char in token): rank for token, rank in model["vocab"].items()}
    except KeyError:
        raise FormatError("tokenizer.json's vocabulary has tokens that are not byte-level") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise FormatError("tokenizer.json's vocabulary ids are not 0..N-1 without gaps")
    added = {token["content"]: token["id"] for token in data.get("added_tokens", [])}
    wanted = {name: len(ranks) + i for i, name in enumerate(SPECIAL_TOKENS)}
    if added != wanted:
        raise FormatError(f"tokenizer.json's special tokens are {added}, nanochat's are {wanted}")
    enc = tiktoken.Encoding(name=ENCODING_NAME, pat_str=steps[0]["pattern"]["Regex"], mergeable_ranks=ranks,
                            special_tokens=wanted)
    return RustBPETokenizer(enc, "<|bos|>")


def same_tokenizer(a, b):
    return (a.enc._mergeable_ranks == b.enc._mergeable_ranks and a.enc._pat_str == b.enc._pat_str
            and a.enc._special_tokens == b.enc._special_tokens)


# -----------------------------------------------------------------------------
# Export

def read_report(base_dir, model_tag, phase):
    """
    The model card's headline numbers from the run's report sections (<base>/report/): {label: value},
    and a note on where they come from (or why there are none).
    """
    from nanochat.report import Report, slugify

    report_dir = os.path.join(base_dir, "report")
    if not os.path.isdir(report_dir):
        return {}, f"No run report in {report_dir}: the card cannot give training figures."
    items = {slugify(name): section_items for name, _, section_items, _ in Report(report_dir).read_sections()}
    training = items.get("base-model-training", {})
    report_tag = training.get("model_tag")
    if report_tag and report_tag != model_tag:
        return {}, f"The run report in {report_dir} is of model {report_tag}, not {model_tag}: no figures taken."
    figures = {
        "Parameters": training.get("Number of parameters"),
        "Training tokens (pretraining)": training.get("Number of training tokens"),
        "Validation bpb (base model)": items.get("base-model-loss", {}).get("val bpb")
        or training.get("Minimum validation bpb"),
        "CORE (base model)": items.get("base-model-evaluation", {}).get("CORE metric"),
    }
    if phase != "base":
        figures[f"ChatCORE ({phase} model)"] = items.get(f"chat-evaluation-{phase}", {}).get("ChatCORE")
    figures = {label: value for label, value in figures.items() if value not in (None, "", "None")}
    note = f"From the run report in {report_dir}." if figures else f"The run report in {report_dir} has no figures."
    return figures, note


PHASE_NAMES = {"base": "pretrained (base)", "mid": "midtrained", "sft": "chat fine-tuned (SFT)",
               "rl": "reinforcement-learned (RL)"}


def model_card(info, model_config, num_params, figures, figures_note, mlx):
    """README.md of the exported folder."""
    c = model_config
    phase = info["phase"]
    title = f"nanochat {info['model_tag']}: {PHASE_NAMES.get(phase, phase)} model, step {info['step']}"
    figure_lines = [f"| {label} | {value} |" for label, value in figures.items()]
    figure_table = (["| Figure | Value |", "|---|---|", *figure_lines, ""] if figure_lines else [])
    loader = ("mlx-lm's `nanochat` model (this folder keeps nanochat's own weight names, which mlx-lm reads; "
              "transformers cannot load it: export again without `--mlx` for transformers)" if mlx else
              "transformers' `NanoChatForCausalLM` (model_type `nanochat`), no custom code")
    lines = [
        "---",
        "library_name: " + ("mlx" if mlx else "transformers"),
        "pipeline_tag: text-generation",
        "tags: [nanochat]",
        "---",
        "",
        f"# {title}",
        "",
        f"A GPT-style language model trained from scratch with [nanochat](https://github.com/karpathy/nanochat), "
        f"exported for {loader}.",
        "",
        "## Architecture",
        "",
        f"- {c['n_layer']} layers, width {c['n_embd']}, {c['n_head']} query heads and {c['n_kv_head']} key/value "
        f"heads of dimension {c['n_embd'] // c['n_head']}, MLP width {4 * c['n_embd']}",
        f"- {num_params:,} parameters; vocabulary of {c['vocab_size']:,} tokens (byte-level BPE, 9 special tokens); "
        f"trained with a context of {c['sequence_len']} tokens",
        "- rotary position embeddings (base 10000), then RMSNorm of queries and keys; RMSNorm without weights after "
        "the embedding, before each block and before the head; ReLU² MLP; no biases; untied embedding and head; "
        "logits soft-capped at 15 (15·tanh(x/15))",
        "",
        "## Training",
        "",
        *figure_table,
        figures_note,
        "",
        "Data: nanochat's recipe pretrains on FineWeb-Edu shards, then midtrains and fine-tunes on SmolTalk, MMLU, "
        "GSM8K, spelling tasks and identity conversations. A run can point these at other copies (for instance "
        "smaller stand-ins for offline or test runs); the checkpoint does not record which, so this card cannot "
        "tell whether stand-ins were used.",
        "",
        "## Use",
        "",
    ]
    if mlx:
        lines += [
            "On a Mac with Apple silicon (`pip install mlx-lm`):",
            "",
            "```bash",
            'mlx_lm.generate --model . --prompt "Why is the sky blue?"',
            "mlx_lm.chat --model .",
            "```",
            "",
        ]
    else:
        lines += [
            "`PATH` is this folder, or its repository id once on the Hub:",
            "",
            "```python",
            "from transformers import pipeline",
            'chat = pipeline("text-generation", "PATH")',
            'print(chat([{"role": "user", "content": "Why is the sky blue?"}], max_new_tokens=100)'
            '[0]["generated_text"][-1]["content"])',
            "```",
            "",
        ]
    lines += [
        "The tokenizer prepends `<|bos|>` to plain text (every pretraining document starts with it; "
        "`add_special_tokens=False` leaves it out). Generation stops at `<|assistant_end|>` or `<|bos|>`; "
        f"sampling defaults to temperature {CHAT_SAMPLING['temperature']} and top-k {CHAT_SAMPLING['top_k']}, "
        "as in nanochat's chat scripts.",
        "",
        "The chat template renders conversations exactly as nanochat does: `<|bos|>`, a system message merged "
        "into the first user message, `<|user_start|>…<|user_end|>` and `<|assistant_start|>…<|assistant_end|>` "
        "turns. Assistant content may be a list of parts: `text`, `python` (a calculator call, between "
        "`<|python_start|>` and `<|python_end|>`) and `python_output` (the tool's result, between "
        "`<|output_start|>` and `<|output_end|>`). There is no `tool` role and no function-calling schema: nanochat "
        "runs the calculator itself while generating, so outside nanochat a `<|python_start|>` in the output is "
        "just text to act on (or to stop at). Special-token text typed inside a message becomes the special token "
        "here, while nanochat encodes it as plain text.",
        "",
        "Back into nanochat (for its chat scripts, evaluation or further training): "
        "`python -m scripts.import_hf PATH -i " + phase + "`.",
        "",
    ]
    return "\n".join(lines)


def write_folder(out_dir, model_data, model_config, tokenizer, info, card, dtype=None,
                 max_shard_size="5GB", mlx=False, overwrite=False):
    """
    Write the folder (see the module docstring) into a temporary neighbour of out_dir, then rename it into
    place: out_dir is either absent, the old one, or complete. model_data: our state_dict (any dtypes);
    dtype: cast the weights to it (None: keep theirs). mlx: keep our weight names (mlx-lm's nanochat reads
    those) instead of transformers'. card(num_params) -> README text.
    """
    require_hf()
    from huggingface_hub import save_torch_state_dict
    from transformers import GenerationConfig, NanoChatConfig

    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir} already exists: choose another folder, or pass --force to replace it")
    names = weight_names(model_config["n_layer"])
    model_data = {k.removeprefix("_orig_mod."): v for k, v in model_data.items()}
    if set(model_data) != set(names):
        raise FormatError(f"the checkpoint's weights {sorted(set(model_data) ^ set(names))[:4]} do not match "
                          f"nanochat's GPT of {model_config['n_layer']} layers")
    weights = {(ours if mlx else names[ours]): (tensor.to(dtype) if dtype is not None else tensor).contiguous()
               for ours, tensor in model_data.items()}
    weight_dtype = str(weights["lm_head.weight"].dtype).removeprefix("torch.")
    num_params = sum(t.numel() for t in weights.values())

    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    tmp_dir = os.path.join(os.path.dirname(out_dir), f".{os.path.basename(out_dir)}.tmp-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp_dir)
    try:
        NanoChatConfig(**hf_config(model_config, tokenizer, weight_dtype)).save_pretrained(tmp_dir)
        ids = special_ids(tokenizer)
        GenerationConfig(bos_token_id=ids["<|bos|>"], eos_token_id=[ids["<|assistant_end|>"], ids["<|bos|>"]],
                         pad_token_id=ids["<|bos|>"], do_sample=True,
                         **CHAT_SAMPLING).save_pretrained(tmp_dir)
        save_torch_state_dict(weights, tmp_dir, max_shard_size=max_shard_size)
        hf_tokenizer(tokenizer, model_config["sequence_len"]).save_pretrained(tmp_dir)
        nanochat_info = {"format": NANOCHAT_FORMAT, **info, "model_config": model_config,
                         "weight_names": "nanochat" if mlx else "transformers"}
        with open(os.path.join(tmp_dir, NANOCHAT_FILE), "w", encoding="utf-8") as f:
            json.dump(nanochat_info, f, indent=2)
        with open(os.path.join(tmp_dir, "README.md"), "w", encoding="utf-8") as f:
            f.write(card(num_params))
        mode = os.stat(os.path.join(tmp_dir, "config.json")).st_mode & 0o777
        for name in os.listdir(tmp_dir):  # safetensors writes owner-only files: give them the others' mode
            os.chmod(os.path.join(tmp_dir, name), mode)
        old_dir = None
        if os.path.exists(out_dir):  # --force: the old folder steps aside only once the new one is complete
            old_dir = f"{tmp_dir}.old"
            os.rename(out_dir, old_dir)
        os.rename(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    if old_dir:
        shutil.rmtree(old_dir)
    return out_dir


# -----------------------------------------------------------------------------
# Import

def read_folder(folder):
    """
    A folder in this format, checked: (our state_dict with the folder's dtypes, GPTConfig kwargs, RustBPETokenizer,
    nanochat.json's dict or {}). FormatError with one line on anything that does not fit.
    """
    require_hf()
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from nanochat.gpt import GPT, GPTConfig

    if not os.path.isdir(folder):
        raise FormatError(f"{folder} is not a folder")
    for name in ["config.json", "tokenizer.json"]:
        if not os.path.isfile(os.path.join(folder, name)):
            raise FormatError(f"{folder} has no {name}: not a model folder in the Hugging Face format")
    config = read_json(os.path.join(folder, "config.json"))
    info_path = os.path.join(folder, NANOCHAT_FILE)
    info = read_json(info_path) if os.path.isfile(info_path) else {}
    model_config = our_config(config, info)

    # the weights: one file, or shards listed by an index
    index_path = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index_path):
        weight_map = read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict):
            raise FormatError(f"{index_path} has no weight_map")
        files = sorted(set(weight_map.values()))
    elif os.path.isfile(os.path.join(folder, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise FormatError(f"{folder} has no model.safetensors (nor model.safetensors.index.json)")
    weights = {}
    for name in files:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise FormatError(f"{path} is missing (listed in the index)")
        try:
            weights.update(load_file(path))
        except (SafetensorError, OSError) as e:
            raise FormatError(f"{path} cannot be read as safetensors ({str(e).splitlines()[0]})") from None

    # the names: transformers' or (an mlx-lm folder) ours; the shapes: those of our GPT with this config
    names = weight_names(model_config["n_layer"])
    if "model.embed_tokens.weight" in weights:
        to_ours = {theirs: ours for ours, theirs in names.items()}
        weights = {to_ours.get(name, name): tensor for name, tensor in weights.items()}
    with torch.device("meta"):
        expected = {name: tuple(t.shape) for name, t in GPT(GPTConfig(**model_config)).state_dict().items()}
    if missing := sorted(set(expected) - set(weights)):
        raise FormatError(f"the weights lack {len(missing)} tensors that config.json implies, e.g. "
                          f"{names.get(missing[0], missing[0])}")
    if unexpected := sorted(set(weights) - set(expected)):
        raise FormatError(f"the weights have {len(unexpected)} tensors nanochat's GPT has no place for, e.g. "
                          f"{unexpected[0]}")
    for name, shape in expected.items():
        if tuple(weights[name].shape) != shape:
            raise FormatError(f"weight {names.get(name, name)} has shape {tuple(weights[name].shape)} but config.json "
                              f"implies {shape}")

    tokenizer = tokenizer_from_json(os.path.join(folder, "tokenizer.json"))
    if tokenizer.get_vocab_size() != model_config["vocab_size"]:
        raise FormatError(f"tokenizer.json has {tokenizer.get_vocab_size():,} tokens but config.json's vocab_size is "
                          f"{model_config['vocab_size']:,}")
    check_tokenizer_agrees(os.path.join(folder, "tokenizer.json"), tokenizer)
    return weights, model_config, tokenizer, info


def read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{path} is not valid JSON ({e})") from None


# texts on which the folder's tokenizer and the rebuilt tiktoken one must agree: words, numbers, code,
# whitespace runs and scripts that the split pattern treats differently
PROBE_TEXTS = [
    "Hello world! It's 2025: 12345 apples, 3.14 pies; don't, we'll, I'M.",
    "  two spaces\tand a tab\n\nnew lines\r\n   indented\n",
    "naïve café Straße Ελλάδα москва 東京 日本語 한국어 e\u0301 ٣٤٥ ½ ²",
    "emoji 🙂🚀 👩‍💻 🇫🇷 \u00a0nbsp \u3000 wide\u200bzero-width",
    "def f(x):\n    return x ** 2  # square\n",
]


def check_tokenizer_agrees(path, tokenizer):
    """The folder's tokenizer (as transformers runs it) must give the rebuilt one's ids, or the import would lie."""
    from tokenizers import Tokenizer
    hf = Tokenizer.from_file(path)
    for text in PROBE_TEXTS:
        if hf.encode(text, add_special_tokens=False).ids != tokenizer.encode(text):
            raise FormatError(f"{path} tokenizes {text[:30]!r} differently from the tiktoken tokenizer rebuilt from "
                              f"its ranks: it is not a nanochat-style tokenizer")


def import_folder(folder, phase=None, model_tag=None, step=None, replace_tokenizer=False):
    """
    Write a folder's model as a checkpoint of ours, <base>/<phase folder>/<model_tag>/ at `step` (defaults:
    those in nanochat.json, else sft, d<layers> and 0), and its tokenizer into <base>/tokenizer/ unless the
    same one is there. Everything is checked before anything is written. Returns (phase, model_tag, step).
    """
    from nanochat.checkpoint_manager import CHECKPOINT_FOLDERS, meta_filename, save_checkpoint
    from nanochat.common import get_base_dir
    from nanochat.tokenizer import RustBPETokenizer, get_tokenizer_dir, TOKENIZER_FILE

    weights, model_config, tokenizer, info = read_folder(folder)
    phase = phase or info.get("phase") or "sft"
    model_tag = model_tag or info.get("model_tag") or f"d{model_config['n_layer']}"
    step = step if step is not None else info.get("step", 0)
    checkpoint_dir = os.path.join(get_base_dir(), CHECKPOINT_FOLDERS[phase], model_tag)
    if os.path.exists(os.path.join(checkpoint_dir, meta_filename(step))):
        raise FileExistsError(f"{checkpoint_dir} already has a checkpoint of step {step}: choose another model tag "
                              f"(-g) or step (-s)")
    tokenizer_dir = get_tokenizer_dir()
    write_tokenizer = True
    if os.path.exists(os.path.join(tokenizer_dir, TOKENIZER_FILE)):
        write_tokenizer = not same_tokenizer(RustBPETokenizer.from_directory(tokenizer_dir), tokenizer)
        if write_tokenizer and not replace_tokenizer:
            raise FileExistsError(
                f"{tokenizer_dir} holds a different tokenizer, which every model of this base dir shares: import "
                f"into another base dir (NANOCHAT_BASE_DIR=...), or pass --replace-tokenizer (the models trained "
                f"with the old one then decode wrongly)")
    if write_tokenizer:
        tokenizer.save(tokenizer_dir)
        print(f"Wrote the tokenizer to {tokenizer_dir}")
    origin = {"folder": os.path.abspath(folder), **{key: info[key] for key in ("phase", "model_tag", "step")
                                                     if key in info}}
    meta = {"step": step, "model_config": model_config, "imported_from": origin}
    save_checkpoint(checkpoint_dir, step, weights, None, meta)
    return phase, model_tag, step
