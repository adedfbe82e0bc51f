"""
Export a trained model as a Hugging Face folder that transformers loads as it is (no custom code):

    python -m scripts.export_hf -o out/nanochat-d20            # the SFT model (largest tag, last step)
    python -m scripts.export_hf -i base -g d20 -s 21400 -o out/d20-base
    python -m scripts.export_hf -o out/d20-bf16 -d bfloat16     # half the size
    python -m scripts.export_hf -o out/d20-mlx --mlx            # for mlx-lm on a Mac (nanochat's weight names)

then, in Python:

    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained("out/nanochat-d20")
    tokenizer = AutoTokenizer.from_pretrained("out/nanochat-d20")

The folder (config, safetensors weights, tokenizer, chat template, model card) is written next to its
destination and renamed into place once complete. nanochat/hf_format.py describes it; the way back is
scripts/import_hf.py. Needs the optional extra: pip install -e '.[hf]'.
"""

import argparse
import os

import torch

from nanochat.checkpoint_manager import find_checkpoint, load_checkpoint
from nanochat.common import get_base_dir
from nanochat.hf_format import FormatError, model_card, read_report, require_hf, write_folder
from nanochat.tokenizer import get_tokenizer

parser = argparse.ArgumentParser(description="Export a nanochat model as a Hugging Face (transformers) folder.")
parser.add_argument("-i", "--source", default="sft", choices=["base", "mid", "sft", "rl"],
                    help="training phase of the model (default sft)")
parser.add_argument("-g", "--model-tag", default=None, help="checkpoint folder, e.g. d20 (default: the largest model)")
parser.add_argument("-s", "--step", type=int, default=None, help="checkpoint step (default: the last one)")
parser.add_argument("-o", "--output", required=True, help="folder to write (must not exist, unless --force)")
parser.add_argument("-d", "--dtype", default="saved", choices=["saved", "float32", "bfloat16"],
                    help="dtype of the exported weights (default: as saved in the checkpoint)")
parser.add_argument("--max-shard-size", default="5GB",
                    help="largest safetensors file; larger models are split into shards with an index (default 5GB)")
parser.add_argument("--mlx", action="store_true",
                    help="keep nanochat's weight names, which mlx-lm's nanochat model reads (transformers then cannot "
                         "load the folder)")
parser.add_argument("--force", action="store_true", help="replace the output folder if it exists")
args = parser.parse_args()

try:
    require_hf()
    checkpoint_dir, model_tag, step = find_checkpoint(args.source, args.model_tag, args.step)
    print(f"Exporting {checkpoint_dir} step {step}")
    model_data, _, meta = load_checkpoint(checkpoint_dir, step, "cpu")
    model_config = meta["model_config"]
    tokenizer = get_tokenizer()
    if tokenizer.get_vocab_size() != model_config["vocab_size"]:
        raise FormatError(f"the tokenizer in {get_base_dir()}/tokenizer has {tokenizer.get_vocab_size():,} tokens but "
                          f"the model has {model_config['vocab_size']:,}: use the base dir the model was trained in")
    figures, figures_note = read_report(get_base_dir(), model_tag, args.source)
    info = {"phase": args.source, "model_tag": model_tag, "step": step}
    out_dir = write_folder(
        args.output, model_data, model_config, tokenizer, info,
        card=lambda num_params: model_card(info, model_config, num_params, figures, figures_note, args.mlx),
        dtype=None if args.dtype == "saved" else getattr(torch, args.dtype), max_shard_size=args.max_shard_size,
        mlx=args.mlx, overwrite=args.force)
except (ImportError, FileNotFoundError, FileExistsError, FormatError) as e:
    raise SystemExit(f"export_hf: {e}") from None

size = sum(os.path.getsize(os.path.join(out_dir, name)) for name in os.listdir(out_dir))
print(f"Wrote {out_dir} ({size / 2**20:,.1f} MiB): {', '.join(sorted(os.listdir(out_dir)))}")
