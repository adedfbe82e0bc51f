"""
Chat with a trained model in the terminal; answers stream as they are generated.

    python -m scripts.chat_cli                          # the SFT model, interactive
    python -m scripts.chat_cli -i mid                   # the midtrained model (base|mid|sft|rl)
    python -m scripts.chat_cli -p "What is 12*7?"       # one answer, printed, then exit
    python -m scripts.chat_cli -g d20 -s 700 -t 0.8 -k 50 --device-type cpu

In the chat: 'clear' starts a new conversation, 'quit' or Ctrl-D leaves, Ctrl-C stops an answer.
When the model calls its calculator, the call and the result show as [calculator: 12*7] = 84.

Unlike the training scripts this takes short flags (argparse), the ones the reference's chat uses.
"""

import argparse
import contextlib
import random
import sys

from nanochat.chat import ChatModel, assistant_content
from nanochat.common import autodetect_device_type, compute_init
from nanochat.decode import MODES as DECODE_MODES, session_mode

# how tool tokens look in the terminal
TOOL_DISPLAY = {"<|python_start|>": "[calculator: ", "<|python_end|>": "]",
                "<|output_start|>": " = ", "<|output_end|>": ""}

parser = argparse.ArgumentParser(description="Chat with a trained nanochat model in the terminal.")
parser.add_argument("-i", "--source", default="sft", choices=["base", "mid", "sft", "rl"],
                    help="training phase of the model (default sft)")
parser.add_argument("-g", "--model-tag", default=None, help="checkpoint folder, e.g. d20 (default: the largest model)")
parser.add_argument("-s", "--step", type=int, default=None, help="checkpoint step (default: the last one)")
parser.add_argument("-p", "--prompt", default="", help="ask this one question, print the answer and exit")
parser.add_argument("-t", "--temperature", type=float, default=0.6,
                    help="sampling temperature, 0 = greedy (default 0.6)")
parser.add_argument("-k", "--top-k", type=int, default=50, help="sample among the k most likely tokens (default 50; 0: all)")
parser.add_argument("-m", "--max-tokens", type=int, default=512, help="longest answer in tokens (default 512)")
parser.add_argument("--seed", type=int, default=None, help="sampling seed (default: a new one per answer)")
parser.add_argument("--device-type", default="", choices=["", "cuda", "cpu", "mps"], help="default: autodetect")
parser.add_argument("-d", "--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                    help="dtype to decode in; auto: bf16 where it was measured faster, or compiled on a CPU with bf16 units")
parser.add_argument("--decode-mode", default="", choices=["", *DECODE_MODES],
                    help="how each token is decoded (default: cuda_graph on CUDA; on CPU compiled at start-up for a "
                         "chat, which takes seconds once and then decodes faster, eager for one -p answer)")
args = parser.parse_args()

# Loading talks on stdout; keep stdout for the conversation (with -p, just the answer).
with contextlib.redirect_stdout(sys.stderr):
    _, _, _, _, device = compute_init(args.device_type or autodetect_device_type())
    decode_mode = args.decode_mode or (None if args.prompt else session_mode(device))  # one answer: no compile
    try:
        chat = ChatModel(args.source, device, model_tag=args.model_tag, step=args.step, dtype=args.dtype,
                         decode_mode=decode_mode, samplings=[(args.temperature, args.top_k or None)])
    except FileNotFoundError as e:  # no checkpoint or tokenizer: the message says what to train
        raise SystemExit(str(e)) from None
tokenizer = chat.tokenizer


def ask(messages):
    """Stream the model's answer to the conversation; returns its text (tool calls as token names)."""
    seed = args.seed if args.seed is not None else random.randrange(2**31)
    pieces = []
    try:
        prompt = tokenizer.render_for_completion({"messages": messages})
        for piece in chat.answer(prompt, args.max_tokens, args.temperature, args.top_k or None, seed):
            pieces.append(piece)
            print(TOOL_DISPLAY.get(piece, piece), end="", flush=True)
    except KeyboardInterrupt:
        print(" [stopped]", end="")
    print(flush=True)
    return "".join(pieces)


if args.prompt:
    try:
        ask([{"role": "user", "content": args.prompt}])
    except ValueError as e:  # the prompt does not fit the model's context
        raise SystemExit(str(e)) from None
    sys.exit(0)

print(f"nanochat ({args.source} model {chat.describe()})")
print("Type a message and press Enter. 'clear' starts a new conversation, 'quit' or Ctrl-D leaves, "
      "Ctrl-C stops an answer.")
with contextlib.suppress(ImportError):
    import readline  # noqa: F401  (line editing and history for input(), where available)
messages = []
while True:
    try:
        user_text = input("\nYou: ").strip()
    except (EOFError, KeyboardInterrupt):
        print()
        break
    if user_text.lower() in ("quit", "exit"):
        break
    if user_text.lower() == "clear":
        messages = []
        print("(new conversation)")
        continue
    if not user_text:
        continue
    messages.append({"role": "user", "content": user_text})
    print("nanochat: ", end="", flush=True)
    try:
        answer = ask(messages)
    except ValueError as e:  # the conversation outgrew the model's context
        print(f"\n({e}: type 'clear')")
        messages.pop()
        continue
    messages.append({"role": "assistant", "content": assistant_content(answer)})
print("Bye.")
