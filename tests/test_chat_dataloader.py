"""
nanochat/chat_dataloader.py: SFT targets are ignored exactly where the mask is 0 (and on the padding),
the packed midtraining stream is the rendered conversations back to back, both loaders resume exactly
from any state they yield, and a tiny model trained on SFT batches overfits one conversation.
"""

import itertools
import random

import pytest
import torch

from nanochat.chat_dataloader import collate_sft, packed_conversation_loader, sft_loader
from nanochat.gpt import GPTConfig, build_gpt
from nanochat.tokenizer import RustBPETokenizer


@pytest.fixture(scope="module")
def tokenizer():
    rng = random.Random(0)
    words = ["the", "cat", "sat", "on", "mat", "what", "is", "two", "plus", "three", "five", "answer", "hello"]
    texts = [" ".join(rng.choice(words) for _ in range(40)) + " 0123456789 +-*/=?" for _ in range(50)]
    return RustBPETokenizer.train_from_iterator(iter(texts), 300)


def conversations(n, seed=0):
    """Varied lengths, with system messages, multi-turn exchanges and calculator calls."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        messages = [{"role": "user", "content": f"what is {a} plus {b}?"},
                    {"role": "assistant", "content": [{"type": "text", "text": "the answer is "},
                                                      {"type": "python", "text": f"{a}+{b}"},
                                                      {"type": "python_output", "text": str(a + b)},
                                                      {"type": "text", "text": f" so {a + b}"}]}]
        for _ in range(rng.randint(0, 2)):
            user_text = " ".join(rng.choice(["hello", "cat", "mat", "sat"]) for _ in range(rng.randint(1, 9)))
            messages += [{"role": "user", "content": user_text},
                         {"role": "assistant", "content": "the cat sat on the mat " * rng.randint(1, 3)}]
        if i % 3 == 0:
            messages.insert(0, {"role": "system", "content": "answer with the cat"})
        out.append({"messages": messages})
    return out


def test_sft_targets_are_ignored_exactly_where_the_mask_is_0(tokenizer):
    rows = [tokenizer.render_conversation(c) for c in conversations(5)]
    pad = tokenizer.encode_special("<|assistant_end|>")
    inputs, targets = collate_sft(rows, pad)
    width = max(len(ids) for ids, _ in rows) - 1
    assert inputs.shape == targets.shape == (5, width)
    for i, (ids, mask) in enumerate(rows):
        n = len(ids) - 1
        assert inputs[i, :n].tolist() == ids[:-1] and (inputs[i, n:] == pad).all()
        for t in range(n):
            assert targets[i, t].item() == (ids[t + 1] if mask[t + 1] == 1 else -1)
        assert (targets[i, n:] == -1).all()
    # what is supervised: the assistant's text, its python calls and <|assistant_end|>, never the tool output
    ids, mask = rows[0]
    supervised = [t for t, m in zip(ids, mask) if m == 1]
    special = tokenizer.encode_special
    assert special("<|python_start|>") in supervised and special("<|assistant_end|>") in supervised
    assert special("<|output_start|>") not in supervised and special("<|user_start|>") not in supervised


def test_sft_loader_rows_and_exact_resume(tokenizer):
    data = conversations(7)
    loader = sft_loader(data, tokenizer, batch_size=3, device="cpu", max_tokens=40)
    batches = list(itertools.islice(loader, 5))  # 15 rows: wraps around the 7 conversations twice
    first_rows = collate_sft([tokenizer.render_conversation(data[i], max_tokens=40) for i in (0, 1, 2)],
                             tokenizer.encode_special("<|assistant_end|>"))
    assert torch.equal(batches[0][0], first_rows[0]) and torch.equal(batches[0][1], first_rows[1])
    assert batches[0][0].shape[1] <= 39
    assert [b[2]["conversation"] for b in batches] == [3, 6, 9, 12, 15]
    for k in range(4):
        resumed = sft_loader(data, tokenizer, batch_size=3, device="cpu", max_tokens=40, resume_state=batches[k][2])
        for expected, got in zip(batches[k + 1:], resumed):
            assert torch.equal(expected[0], got[0]) and torch.equal(expected[1], got[1]) and expected[2] == got[2]


def test_packed_stream_is_the_conversations_back_to_back(tokenizer):
    data = conversations(9)
    B, T = 2, 16
    loader = packed_conversation_loader(data, tokenizer, B, T, "cpu")
    batches = list(itertools.islice(loader, 30))
    stream = [t for c in itertools.islice(itertools.cycle(data), 100) for t in tokenizer.render_conversation(c)[0]]
    needed = B * T + 1
    for k, (x, y, state) in enumerate(batches):
        window = stream[k * needed:(k + 1) * needed]  # B*T+1 tokens per batch, as in the reference
        assert x.flatten().tolist() == window[:-1] and y.flatten().tolist() == window[1:]
    assert batches[-1][2]["epoch_fraction"] > 1  # 30 x 33 tokens: more than the 9 conversations
    # resuming from any yielded state continues exactly, including from the middle of a conversation
    assert any(b[2]["offset"] > 0 for b in batches)
    for k in range(len(batches) - 1):
        resumed = packed_conversation_loader(data, tokenizer, B, T, "cpu", resume_state=batches[k][2])
        for expected, got in zip(batches[k + 1:], resumed):
            assert torch.equal(expected[0], got[0]) and torch.equal(expected[1], got[1]) and expected[2] == got[2]


def test_resume_state_of_another_world_size_is_refused(tokenizer):
    saved = {"ranks": [{"conversation": 3, "offset": 0}, {"conversation": 3, "offset": 0}]}
    with pytest.raises(ValueError, match="same number of processes"):
        next(packed_conversation_loader(conversations(4), tokenizer, 1, 8, "cpu", resume_state=saved))


def test_tiny_model_overfits_one_conversation(tokenizer):
    """Training on SFT batches of a single conversation drives the loss on its assistant tokens to ~0."""
    torch.manual_seed(0)
    conversation = conversations(1, seed=3)[0]
    inputs, targets, _ = next(sft_loader([conversation], tokenizer, batch_size=1, device="cpu"))
    assert (targets >= 0).sum() > 10 and (targets == -1).sum() > 5  # both kinds of positions are there
    config = GPTConfig(sequence_len=128, vocab_size=tokenizer.get_vocab_size(), n_layer=1, n_head=1, n_kv_head=1,
                       n_embd=32)
    model = build_gpt(config)
    optimizers = model.setup_optimizers(unembedding_lr=0.02, embedding_lr=0.2, matrix_lr=0.04)
    losses = []
    for _ in range(40):
        loss = model(inputs, targets)
        loss.backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[0] > 5.0  # ~ln(300) at the start (the lm_head starts at zero)
    assert losses[-1] < 0.05, losses[-10:]
    # the model now writes the assistant's part itself: greedy predictions match every supervised target
    with torch.no_grad():
        predictions = model(inputs).argmax(-1)
    supervised = targets >= 0
    assert torch.equal(predictions[supervised], targets[supervised])
