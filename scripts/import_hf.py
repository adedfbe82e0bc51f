"""
Import a model folder in the Hugging Face format (what scripts/export_hf.py writes, e.g. a published
nanochat model downloaded from the Hub) as a checkpoint of ours, so that chat_cli, chat_web, chat_eval,
base_eval and further training (mid_train, chat_sft, chat_rl) use it:

    python -m scripts.import_hf out/nanochat-d20                  # phase, tag and step as exported
    python -m scripts.import_hf ~/Downloads/nanochat-d32 -i sft -g d32
    python -m scripts.chat_cli -i sft -g d32

The checkpoint goes to <base>/<phase folder>/<tag>/ and the tokenizer to <base>/tokenizer/, which every
model of a base dir shares: a different tokenizer already there is not replaced unless --replace-tokenizer
is given. A folder that does not fit (another model_type, missing files, shapes that do not fit the
config) is refused with one line, before anything is written. Needs the optional extra: pip install -e '.[hf]'.
"""

import argparse

from nanochat.hf_format import FormatError, import_folder

parser = argparse.ArgumentParser(description="Import a Hugging Face nanochat folder as a nanochat checkpoint.")
parser.add_argument("folder", help="the folder (config.json, model.safetensors, tokenizer.json, ...)")
parser.add_argument("-i", "--source", default=None, choices=["base", "mid", "sft", "rl"],
                    help="training phase to file it under (default: the exported one, else sft)")
parser.add_argument("-g", "--model-tag", default=None,
                    help="checkpoint folder to create, e.g. d20 (default: the exported one, else d<layers>)")
parser.add_argument("-s", "--step", type=int, default=None, help="step to save it as (default: the exported one, else 0)")
parser.add_argument("--replace-tokenizer", action="store_true",
                    help="replace a different tokenizer in the base dir (models trained with it then decode wrongly)")
args = parser.parse_args()

try:
    phase, model_tag, step = import_folder(args.folder, args.source, args.model_tag, args.step, args.replace_tokenizer)
except (ImportError, FileExistsError, FormatError) as e:
    raise SystemExit(f"import_hf: {e}") from None
print(f"Imported {args.folder} as {phase} model {model_tag}, step {step}. Chat with it: "
      f"python -m scripts.chat_cli -i {phase} -g {model_tag}")
