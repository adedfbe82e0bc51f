"""
Drawing the next token from the model's logits: greedy (temperature 0), among the top_k most likely tokens, or
over the whole vocabulary, at a temperature. A draw is torch.multinomial's own (the same tokens from the same
seed as the reference's sampler), computed without its checks.

A draw is split in two: the random numbers (exponential_noise, from the generator) and the pick from the logits
given them (pick_top_k). A compiled decode step then picks inside its own generated code, given numbers drawn
outside it, and draws exactly what the plain sampler draws (nanochat/decode.py).
"""

import torch
import torch.nn.functional as F


def check_temperature(temperature):
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")


def sample_next_token(logits, generator, temperature=1.0, top_k=None, cap=None):
    """
    logits (B, V) -> next token ids (B, 1). temperature 0 is greedy; top_k keeps the k largest logits.
    cap: an increasing function that makes the logits given into the model's (gpt.soft_cap, when they are the
    lm_head's). It changes no logit's rank, so it is applied only to the logits a draw needs: none when greedy,
    the k kept ones with top_k (capping a batch-8 vocabulary took 65 us of a 1.25 ms compiled depth-4 CPU step).
    """
    check_temperature(temperature)
    if temperature == 0.0:
        return greedy(logits)
    if top_k is not None:
        noise = exponential_noise((logits.size(0), min(top_k, logits.size(-1))), generator)
        return pick_top_k(logits, noise, temperature, cap)
    cap = cap or (lambda x: x)
    return draw_one(F.softmax(cap(logits.float()) / temperature, dim=-1), generator)


def greedy(logits):
    return torch.argmax(logits.float(), dim=-1, keepdim=True)  # on CPU, 4x faster in fp32 than in bf16


def exponential_noise(shape, generator):
    """Exp(1) draws in fp32 on the generator's device: the random numbers of one draw per row of shape[0]."""
    return torch.empty(shape, device=generator.device).exponential_(1, generator=generator)


def pick_top_k(logits, noise, temperature, cap=None):
    """
    The token drawn among the noise.size(1) largest logits of each row, at temperature (a number or a 0-d tensor),
    given that draw's exponential_noise: what sample_next_token draws with that top_k from the same generator.
    """
    values, indices = torch.topk(logits, noise.size(1), dim=-1)  # (B, k)
    probs = F.softmax((cap or (lambda x: x))(values.float()) / temperature, dim=-1)
    return indices.gather(1, (probs / noise).argmax(dim=-1, keepdim=True))


def draw_one(probs, generator):
    """
    torch.multinomial(probs, 1, generator=generator), the same draw from the same generator state: argmax of
    probs / q with q ~ Exp(1) (the Gumbel-max trick, as torch computes one sample), without torch's checks that
    probs are finite, non-negative and not all zero, which cost more than the draw and always hold for a softmax.
    """
    return (probs / exponential_noise(probs.shape, generator)).argmax(dim=-1, keepdim=True)


class Sampler:
    """
    How one generation draws its tokens: sample_next_token's settings and its generator. A compiled decode step
    that draws top-k in its own code (decode.run_step_and_pick) takes step_inputs(...) at each step: the
    random numbers sample_next_token would draw, and the temperature as a tensor (one compiled step serves all).
    """

    def __init__(self, generator, temperature=1.0, top_k=None, cap=None):
        check_temperature(temperature)
        self.generator, self.temperature, self.top_k, self.cap = generator, temperature, top_k, cap
        self.temperature_tensor = torch.tensor(float(temperature), device=generator.device)

    def __call__(self, logits):
        """logits (B, V) -> next token ids (B, 1)"""
        return sample_next_token(logits, self.generator, self.temperature, self.top_k, self.cap)

    @property
    def draws_top_k(self):
        """A top-k draw (not greedy, not over the whole vocabulary): what step_inputs serves."""
        return self.top_k is not None and self.temperature > 0

    def step_inputs(self, batch_size, vocab_size):
        """(noise, temperature) for a top-k draw in decode.run_step_and_pick: what sample_next_token would draw."""
        noise = exponential_noise((batch_size, min(self.top_k, vocab_size)), self.generator)
        return noise, self.temperature_tensor
