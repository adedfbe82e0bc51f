"""
CORE evaluation: prompt text, scored spans, the choice a model makes, cropping, data order, the
centered score, a whole (tiny, generated) bundle, and the atomic download + unzip of a bundle.

The model is a bigram table: the logits at a position depend only on the token there, so the loss
of each scored token can be written down by hand. The tokenizer maps each character to its code point.
"""

import json
import math
import os
import random
import zipfile

import pytest
import torch

from nanochat.core_eval import (
    centered_score, crop_left, evaluate_core, evaluate_example, evaluate_task, load_task_data,
    render_prompts_lm, render_prompts_mc, render_prompts_schema, sample_fewshot, tokenize_prompts,
)

V = 128  # ASCII
BOS = 0  # "\x00" never appears in the test text
BOOST = 5.0  # logit of a liked next token; every other logit is 0

LOSS_LIKED = math.log(math.exp(BOOST) + V - 1) - BOOST  # target is the liked successor
LOSS_UNLIKED = math.log(math.exp(BOOST) + V - 1)  # the previous token likes some other successor
LOSS_FLAT = math.log(V)  # the previous token likes nothing: uniform


class CharTokenizer:
    def get_bos_token_id(self):
        return BOS

    def __call__(self, text, prepend=None):
        if isinstance(text, list):
            return [self(t, prepend) for t in text]
        return ([] if prepend is None else [prepend]) + [ord(c) for c in text]


class BigramModel(torch.nn.Module):
    """logits[b, t] = table[idx[b, t]]: each character 'likes' at most one successor."""

    def __init__(self, liked_pairs, max_seq_len=None):
        super().__init__()
        self.table = torch.zeros(V, V)
        for prev, nxt in liked_pairs:
            assert self.table[ord(prev)].max() == 0, "one liked successor per character keeps the losses simple"
            self.table[ord(prev), ord(nxt)] = BOOST
        if max_seq_len is not None:
            self.max_seq_len = max_seq_len
        self.seen_lengths = []

    def forward(self, idx):
        self.seen_lengths.append(idx.size(1))
        return self.table[idx]  # (B, T, V)


MC_META = {"task_type": "multiple_choice", "num_fewshot": 0, "continuation_delimiter": " "}
SCHEMA_META = {"task_type": "schema", "num_fewshot": 0, "continuation_delimiter": " "}
LM_META = {"task_type": "language_modeling", "num_fewshot": 0, "continuation_delimiter": " "}


# -----------------------------------------------------------------------------
# prompt text


def test_render_mc_with_fewshot():
    fewshot = [{"query": "Q1?", "choices": ["a1", "b1"], "gold": 1},
               {"query": "Q2?", "choices": ["a2", "b2"], "gold": 0}]
    item = {"query": "Q3?", "choices": ["x", "y"], "gold": 0}
    assert render_prompts_mc(item, "\nAnswer: ", fewshot) == [
        "Q1?\nAnswer: b1\n\nQ2?\nAnswer: a2\n\nQ3?\nAnswer: x",
        "Q1?\nAnswer: b1\n\nQ2?\nAnswer: a2\n\nQ3?\nAnswer: y",
    ]
    assert render_prompts_mc(item, " ", []) == ["Q3? x", "Q3? y"]


def test_render_schema_with_fewshot():
    fewshot = [{"context_options": ["c1", "d1"], "continuation": "end1", "gold": 1}]
    item = {"context_options": ["Ann ran", "Bob ran"], "continuation": "home.", "gold": 0}
    assert render_prompts_schema(item, " ", fewshot) == ["d1 end1\n\nAnn ran home.", "d1 end1\n\nBob ran home."]


def test_render_lm_strips_contexts_and_the_prompt_without_continuation():
    fewshot = [{"context": "  2+2= ", "continuation": "4"}]
    item = {"context": "3+3=  ", "continuation": "6"}
    assert render_prompts_lm(item, "\nAnswer: ", fewshot) == [
        "2+2=\nAnswer: 4\n\n3+3=\nAnswer:",  # trailing space of the delimiter stripped too
        "2+2=\nAnswer: 4\n\n3+3=\nAnswer: 6",
    ]


def test_fewshot_sampling_is_fixed_per_example_and_excludes_it():
    data = [{"id": i} for i in range(30)]
    for idx in (0, 7, 29):
        shots = sample_fewshot(data, idx, 10)
        others = [i for i in range(len(data)) if i != idx]
        expected = [data[i] for i in random.Random(1234 + idx).sample(others, 10)]
        assert shots == expected and data[idx] not in shots
    assert sample_fewshot(data, 3, 0) == []
    with pytest.raises(ValueError, match="few-shot"):
        sample_fewshot(data[:3], 0, 5)


# -----------------------------------------------------------------------------
# scored spans and the choices a model makes


def test_mc_span_starts_at_first_differing_token():
    tokens, starts, ends = tokenize_prompts(CharTokenizer(), "multiple_choice", ["Q xy", "Q xz"])
    # the shared 'x' belongs to the common prefix, so only the last token is scored
    assert starts == [4, 4] and ends == [5, 5] and tokens[0] == [BOS, ord("Q"), ord(" "), ord("x"), ord("y")]


def test_mc_picks_lowest_mean_loss_not_lowest_sum():
    item = {"query": "Q", "choices": ["pq", "rst"], "gold": 1}
    model = BigramModel([(" ", "p"), ("r", "s"), ("s", "t")])
    # choice 0: ' '->p liked, p->q flat;  choice 1: ' '->r unliked, r->s liked, s->t liked
    mean0 = (LOSS_LIKED + LOSS_FLAT) / 2
    mean1 = (LOSS_UNLIKED + 2 * LOSS_LIKED) / 3
    assert mean1 < mean0 and 3 * mean1 > 2 * mean0  # the sum would pick choice 0
    assert evaluate_example(0, model, CharTokenizer(), [item], "cpu", MC_META) is True
    assert evaluate_example(0, model, CharTokenizer(), [dict(item, gold=0)], "cpu", MC_META) is False
    assert model.seen_lengths[0] == len("\x00Q rst")  # both choices in one padded batch


def test_schema_scores_the_shared_continuation_under_each_context():
    item = {"context_options": ["ab", "cd"], "continuation": "xy", "gold": 1}
    tokens, starts, ends = tokenize_prompts(CharTokenizer(), "schema", render_prompts_schema(item, " "))
    assert starts == [3, 3] and ends == [6, 6]  # " xy" is the common suffix
    model = BigramModel([("d", " ")])  # only context 1 leads naturally into the continuation
    assert evaluate_example(0, model, CharTokenizer(), [item], "cpu", SCHEMA_META) is True
    model = BigramModel([("b", " ")])
    assert evaluate_example(0, model, CharTokenizer(), [item], "cpu", SCHEMA_META) is False


def test_lm_needs_every_continuation_token_predicted():
    item = {"context": "ab ", "continuation": "cd"}
    # prompt "ab cd": scored targets ' ', 'c', 'd' predicted after 'b', ' ', 'c'
    model = BigramModel([("b", " "), (" ", "c"), ("c", "d")])
    assert evaluate_example(0, model, CharTokenizer(), [item], "cpu", LM_META) is True
    assert evaluate_example(0, BigramModel([("b", " "), (" ", "c")]), CharTokenizer(), [item], "cpu", LM_META) is False
    # the context before the span does not matter
    model = BigramModel([("a", "z"), ("b", " "), (" ", "c"), ("c", "d")])
    assert evaluate_example(0, model, CharTokenizer(), [item], "cpu", LM_META) is True


def test_evaluate_task_accuracy():
    model = BigramModel([(" ", "p"), ("p", "q")])
    data = [{"query": "Q", "choices": ["pq", "zz"], "gold": 0}, {"query": "R", "choices": ["zz", "pq"], "gold": 0},
            {"query": "S", "choices": ["zz", "zz ", "pq"], "gold": 2},
            {"query": "T", "choices": ["pq", "zq"], "gold": 0}]
    assert evaluate_task(model, CharTokenizer(), data, "cpu", MC_META) == 0.75


def test_a_long_task_reports_its_progress(capsys):
    model = BigramModel([(" ", "p"), ("p", "q")])
    data = [{"query": q, "choices": ["pq", "zz"], "gold": 0} for q in "QRSTUVWX"]
    # batches of one example (batch_tokens=1), a report after every one (progress_every=0)
    assert evaluate_task(model, CharTokenizer(), data, "cpu", MC_META, batch_tokens=1, name="toy", progress_every=0) == 1
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("toy:")]
    assert len(lines) == len(data) - 1  # none once everything is done
    assert "12% of its tokens" in lines[0] and "88% of its tokens" in lines[-1] and "eta" in lines[-1]
    evaluate_task(model, CharTokenizer(), data, "cpu", MC_META, batch_tokens=1, progress_every=0)  # no name: quiet
    assert "of its tokens" not in capsys.readouterr().out


class AllLogits(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.inner = model

    def forward(self, idx):
        return self.inner(idx)


def test_batched_examples_score_as_one_at_a_time():
    # a real (small, random) GPT: padding on the right, other examples in the same forward pass, and
    # computing logits at the scored positions only, and running a shared prefix once change no decision
    from nanochat.gpt import GPTConfig, build_gpt
    from nanochat.core_eval import evaluate_batch, prepare_example, shared_prefix_choice

    torch.manual_seed(0)
    model = build_gpt(GPTConfig(sequence_len=64, vocab_size=V, n_layer=2, n_head=2, n_kv_head=1, n_embd=64))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2 and not p.any():
                p.normal_(0.0, 2.0 / math.sqrt(p.size(1)))
    model.eval()
    rng = random.Random(0)
    words = ["cat", "dog", "sun", "rain", "blue", "tree", "stone", "river", "cloud", "apple pie"]
    tasks = {
        "multiple_choice": [{"query": " ".join(rng.choices(words, k=rng.randint(1, 6))),
                             "choices": rng.sample(words, 3), "gold": rng.randint(0, 2)} for _ in range(12)],
        "schema": [{"context_options": [" ".join(rng.choices(words, k=rng.randint(1, 5))) for _ in range(2)],
                    "continuation": rng.choice(words), "gold": rng.randint(0, 1)} for _ in range(12)],
        "language_modeling": [{"context": " ".join(rng.choices(words, k=rng.randint(1, 5))), "continuation": "a"}
                              for _ in range(12)],
    }
    for task_type, data in tasks.items():
        meta = {"task_type": task_type, "num_fewshot": 2, "continuation_delimiter": " "}
        alone = [evaluate_example(i, model, CharTokenizer(), data, "cpu", meta) for i in range(len(data))]
        # the logits of every position (a wrapper hides lm_head from logits_only_at) give the same decisions
        every_position = [evaluate_example(i, AllLogits(model), CharTokenizer(), data, "cpu", meta)
                          for i in range(len(data))]
        assert every_position == alone
        examples = [(i, prepare_example(i, model, CharTokenizer(), data, meta)) for i in range(len(data))]
        assert evaluate_batch(model, CharTokenizer(), data, "cpu", meta, examples) == alone
        assert len(set(alone)) == 2 or task_type == "language_modeling"  # the decisions are not all alike
        if task_type == "multiple_choice":  # the shared prefix once, then the choices on a KV cache
            for i, (tokens, starts, ends) in examples:
                chosen = shared_prefix_choice(model, CharTokenizer(), "cpu", tokens, starts[0], ends)
                assert (chosen == data[i]["gold"]) == alone[i]
        for batch_tokens in (1, 200, 10 ** 6):  # one example per forward, a few, all in one
            accuracy = evaluate_task(model, CharTokenizer(), data, "cpu", meta, batch_tokens)
            assert accuracy == pytest.approx(sum(alone) / len(data))


def _task_worker(rank, world_size, init_file, queue):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    model = BigramModel([(" ", "p"), ("p", "q")])
    data = [{"query": f"Q{i}", "choices": ["pq", "zz"], "gold": int(i % 3 == 0)} for i in range(7)]
    queue.put((rank, evaluate_task(model, CharTokenizer(), data, "cpu", MC_META)))
    dist.barrier()  # leave together: a rank exiting while the other still talks to it can abort in gloo
    dist.destroy_process_group()


@pytest.mark.slow
def test_evaluate_task_over_two_ranks(run_two_ranks):
    results = run_two_ranks(_task_worker)
    # "pq" always wins; gold is "pq" for i = 1, 2, 4, 5 -> 4 of 7, whichever rank scored them
    assert results[0] == results[1] == pytest.approx(4 / 7)


# -----------------------------------------------------------------------------
# cropping


def test_crop_left_shifts_spans():
    tokens, starts, ends = crop_left([[1, 2, 3, 4, 5, 6], [1, 2, 3]], [4, 2], [6, 3], max_len=4)
    assert tokens == [[3, 4, 5, 6], [1, 2, 3]] and starts == [2, 2] and ends == [4, 3]
    with pytest.raises(ValueError, match="does not fit"):
        crop_left([[1, 2, 3, 4, 5, 6]], [2], [6], max_len=4)


def test_long_prompts_are_cropped_from_the_left_to_max_seq_len():
    item = {"query": "zzzzzzzzzz", "choices": ["pq", "rst"], "gold": 1}
    model = BigramModel([(" ", "p"), ("r", "s"), ("s", "t")], max_seq_len=6)
    assert evaluate_example(0, model, CharTokenizer(), [item], "cpu", MC_META) is True
    assert model.seen_lengths == [6]  # "zzz pq" and "zz rst": the last 6 tokens of each
    # same decision as the uncropped model: only context far from the answer was dropped
    model = BigramModel([(" ", "p"), ("r", "s"), ("s", "t")])
    assert evaluate_example(0, model, CharTokenizer(), [item], "cpu", MC_META) is True


# -----------------------------------------------------------------------------
# data order, centered score, a whole bundle


def write_jsonl(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def test_shuffle_order_is_fixed_and_max_per_task_takes_a_prefix(tmp_path):
    rows = [{"i": i} for i in range(50)]
    write_jsonl(str(tmp_path / "t.jsonl"), rows)
    full = load_task_data(str(tmp_path / "t.jsonl"))
    expected = list(rows)
    random.Random(1337).shuffle(expected)
    assert full == expected and full != rows
    assert load_task_data(str(tmp_path / "t.jsonl")) == full
    assert load_task_data(str(tmp_path / "t.jsonl"), max_per_task=10) == full[:10]


def test_centered_score():
    assert centered_score(0.25, 25) == 0.0
    assert centered_score(1.0, 25) == 1.0
    assert centered_score(0.625, 25) == pytest.approx(0.5)
    assert centered_score(0.3, 0) == pytest.approx(0.3)
    assert centered_score(0.4, 50) == pytest.approx(-0.2)


def make_bundle(root):
    """A tiny bundle: one task of each type, plus a task listed in core.yaml whose file is missing."""
    bundle = os.path.join(root, "eval_bundle")
    write_jsonl(os.path.join(bundle, "eval_data", "mc.jsonl"),
                [{"query": f"Q{i}", "choices": ["pq", "zz"], "gold": i % 2} for i in range(6)])
    write_jsonl(os.path.join(bundle, "eval_data", "schema.jsonl"),
                [{"context_options": ["ab", "cd"], "continuation": "xy", "gold": 1} for _ in range(4)])
    write_jsonl(os.path.join(bundle, "eval_data", "lm.jsonl"),
                [{"context": "gh", "continuation": "cd"}, {"context": "gh", "continuation": "ce"}])
    with open(os.path.join(bundle, "core.yaml"), "w", encoding="utf-8") as f:
        f.write(
            "icl_tasks:\n"
            "- label: tiny_mc\n  dataset_uri: mc.jsonl\n  num_fewshot: [2]\n  icl_task_type: multiple_choice\n"
            "  continuation_delimiter: ' '\n"
            "- label: tiny_schema\n  dataset_uri: schema.jsonl\n  num_fewshot: [0]\n  icl_task_type: schema\n"
            "- label: tiny_lm\n  dataset_uri: lm.jsonl\n  num_fewshot: [1]\n  icl_task_type: language_modeling\n"
            "- label: not_shipped\n  dataset_uri: missing.jsonl\n  num_fewshot: [0]\n  icl_task_type: schema\n"
        )
    with open(os.path.join(bundle, "eval_meta_data.csv"), "w", encoding="utf-8") as f:
        f.write("Eval Task,Task Category,Task Type,#shots,#datapoints,Random baseline,Centered Metric?,Description\n"
                "tiny_mc,x,multiple choice,2,6,50,,\"a, b\"\ntiny_schema,x,schema,0,4,50,,d\n"
                "tiny_lm,x,language modeling,1,2,0,,d\n"
                "not_shipped,x,schema,0,1,50,,d\n")
    return bundle


def test_evaluate_core_on_a_tiny_bundle(tmp_path):
    bundle = make_bundle(str(tmp_path))
    # p->q makes "pq" the answer everywhere; d->' ' picks context 1; h->' '->c->d completes "cd" only
    model = BigramModel([(" ", "c"), ("p", "q"), ("d", " "), ("h", " "), ("c", "d")])
    out = evaluate_core(model, CharTokenizer(), "cpu", bundle)
    assert out["skipped"] == {"not_shipped": "data file missing.jsonl not in the bundle"}
    assert list(out["results"]) == ["tiny_mc", "tiny_schema", "tiny_lm"]
    # mc: ' '->p and ' '->z are both unliked, p->q liked beats z->z flat, so "pq" (gold on even i) wins
    assert out["results"] == {"tiny_mc": 0.5, "tiny_schema": 1.0, "tiny_lm": 0.5}
    assert out["centered_results"] == {"tiny_mc": 0.0, "tiny_schema": 1.0, "tiny_lm": 0.5}
    assert out["core_metric"] == pytest.approx(0.5)
    assert set(out["times"]) == set(out["results"])


def test_max_per_task_must_leave_room_for_the_fewshot_examples(tmp_path):
    bundle = make_bundle(str(tmp_path))
    model = BigramModel([("p", "q")])
    with pytest.raises(ValueError, match="--max_per_task=3 or more"):
        evaluate_core(model, CharTokenizer(), "cpu", bundle, max_per_task=2)  # tiny_mc is 2-shot
    assert evaluate_core(model, CharTokenizer(), "cpu", bundle, max_per_task=3)["results"]["tiny_mc"] >= 0


# -----------------------------------------------------------------------------
# bundle download (file:// URL) and atomic unzip


def test_bundle_download_and_atomic_unzip(tmp_path, monkeypatch):
    from nanochat import core_eval as base_eval

    src = make_bundle(str(tmp_path / "src"))
    zip_path = str(tmp_path / "eval_bundle.zip")
    with zipfile.ZipFile(zip_path, "w") as zf:
        for folder, _, files in os.walk(src):
            for name in files:
                full = os.path.join(folder, name)
                zf.write(full, os.path.relpath(full, str(tmp_path / "src")))
    base = tmp_path / "base"
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    monkeypatch.setenv("NANOCHAT_EVAL_BUNDLE_URL", "file://" + zip_path)

    bundle_dir = base_eval.ensure_eval_bundle()
    assert bundle_dir == str(base / "eval_bundle")
    unpacked, original = os.path.join(bundle_dir, "eval_data", "lm.jsonl"), os.path.join(src, "eval_data", "lm.jsonl")
    assert open(unpacked).read() == open(original).read()
    leftovers = [n for n in os.listdir(base) if n.endswith(".tmp")]
    assert leftovers == []

    # a zip already downloaded but never unpacked (interrupted run) is unpacked without a download
    os.rename(bundle_dir, str(tmp_path / "moved"))
    monkeypatch.setenv("NANOCHAT_EVAL_BUNDLE_URL", "file://" + str(tmp_path / "does_not_exist.zip"))
    assert os.path.isdir(base_eval.ensure_eval_bundle())

    # a zip that is not a bundle leaves nothing behind
    bad_zip = str(tmp_path / "bad.zip")
    with zipfile.ZipFile(bad_zip, "w") as zf:
        zf.writestr("readme.txt", "hello")
    with pytest.raises(ValueError, match="core.yaml"):
        base_eval.unpack_bundle(bad_zip)
    assert [n for n in os.listdir(base) if n.endswith(".tmp")] == []


def test_results_csv_layout():
    from nanochat.core_eval import format_results_csv

    out = {"results": {"copa": 0.5}, "centered_results": {"copa": 0.0}, "core_metric": 0.0}
    lines = format_results_csv(out).splitlines()
    assert lines[0] == f"{'Task':<35}, {'Accuracy':<10}, {'Centered':<10}"
    assert lines[1] == f"{'copa':<35}, {'0.500000':<10}, {'0.000000':<10}"
    assert lines[2].startswith("CORE") and lines[2].rstrip().endswith("0.000000")
