"""For benchmarks that need no checkpoint: our GPT with random weights, and a tokenizer that never ends a row."""

import math

import torch

from nanochat.gpt import GPTConfig, build_gpt


def random_gpt(depth, vocab_size=8192, sequence_len=1024, seed=0, device="cpu"):
    """The speedrun's shapes for `depth` (width 64 * depth, heads of 128), every matrix drawn at the init's scale:
    the init zeroes lm_head and the output projections, and with them every token would be the same."""
    torch.manual_seed(seed)
    n_embd = 64 * depth
    n_head = max(1, -(-n_embd // 128))
    config = GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=depth, n_head=n_head,
                       n_kv_head=n_head, n_embd=n_embd)
    model = build_gpt(config, device)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "wte" not in name:
                param.normal_(0.0, 1.0 / math.sqrt(param.size(1)))
    return model.eval()


class NoTokenizer:
    """The Engine needs special-token ids for tool use and stopping; -1 never occurs, so every row decodes all of
    max_tokens. Every contender gets it, also with a checkpoint's tokenizer: sampled text (or greedy text in
    another dtype) would end at a different token in each contender, timing unequal work."""

    def encode_special(self, name):
        return -1

    def get_bos_token_id(self):
        return -1
