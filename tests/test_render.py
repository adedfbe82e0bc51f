"""
Chat rendering: ids and masks of hand-built conversations (plain text, each assistant part type, a system
message, truncation), the completion prompt, and the errors a malformed conversation raises.
"""

import copy
import re

import pytest

from nanochat.tokenizer import RustBPETokenizer

TEXT = ("the user asks and the assistant answers; numbers 12 345 and code print(1+2) = 3. "
        "Spell the word: river. How many r are in strawberry? ") * 20


@pytest.fixture(scope="module")
def tok():
    return RustBPETokenizer.train_from_iterator(iter([TEXT]), vocab_size=256 + 9 + 64)


def sp(tok, name):
    return tok.encode_special(name)


def test_plain_turns(tok):
    conversation = {"messages": [
        {"role": "user", "content": "How many r?"},
        {"role": "assistant", "content": "Three."},
        {"role": "user", "content": "Sure?"},
        {"role": "assistant", "content": "Yes"},
    ]}
    ids, mask = tok.render_conversation(conversation)
    u, a = tok.encode("How many r?"), tok.encode("Three.")
    u2, a2 = tok.encode("Sure?"), tok.encode("Yes")
    expected = ([tok.get_bos_token_id(), sp(tok, "<|user_start|>")] + u
                + [sp(tok, "<|user_end|>"), sp(tok, "<|assistant_start|>")] + a
                + [sp(tok, "<|assistant_end|>"), sp(tok, "<|user_start|>")] + u2
                + [sp(tok, "<|user_end|>"), sp(tok, "<|assistant_start|>")] + a2 + [sp(tok, "<|assistant_end|>")])
    expected_mask = ([0, 0] + [0] * len(u) + [0, 0] + [1] * len(a) + [1, 0] + [0] * len(u2) + [0, 0]
                     + [1] * len(a2) + [1])
    assert ids == expected
    assert mask == expected_mask


def test_assistant_parts(tok):
    parts = [
        {"type": "text", "text": "Let me compute. "},
        {"type": "python", "text": "12*3"},
        {"type": "python_output", "text": "36"},
        {"type": "text", "text": " So 36."},
    ]
    ids, mask = tok.render_conversation({"messages": [{"role": "user", "content": "12*3?"},
                                                      {"role": "assistant", "content": parts}]})
    t1, py, out, t2 = (tok.encode(p["text"]) for p in parts)
    prefix = [tok.get_bos_token_id(), sp(tok, "<|user_start|>")] + tok.encode("12*3?") + [sp(tok, "<|user_end|>")]
    assert ids == (prefix + [sp(tok, "<|assistant_start|>")] + t1
                   + [sp(tok, "<|python_start|>")] + py + [sp(tok, "<|python_end|>")]
                   + [sp(tok, "<|output_start|>")] + out + [sp(tok, "<|output_end|>")]
                   + t2 + [sp(tok, "<|assistant_end|>")])
    # the model writes its text and its python call (with the delimiters); the tool writes the output
    assert mask == ([0] * len(prefix) + [0] + [1] * len(t1) + [1] * (len(py) + 2) + [0] * (len(out) + 2)
                    + [1] * len(t2) + [1])


def test_single_text_part_equals_plain_string(tok):
    as_string = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]}
    as_parts = {"messages": [{"role": "user", "content": "hi"},
                             {"role": "assistant", "content": [{"type": "text", "text": "hello "},
                                                               {"type": "text", "text": "there"}]}]}
    ids, mask = tok.render_conversation(as_string)
    # parts are encoded one by one, so split text may tokenize differently; a single part never does
    one_part = {"messages": [as_parts["messages"][0],
                             {"role": "assistant", "content": [{"type": "text", "text": "hello there"}]}]}
    assert tok.render_conversation(one_part) == (ids, mask)
    ids2, _ = tok.render_conversation(as_parts)
    assert tok.decode(ids2) == tok.decode(ids)


def test_system_message_merges_into_first_user_message(tok):
    with_system = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Spell river."},
        {"role": "assistant", "content": "r,i,v,e,r"},
    ]}
    before = copy.deepcopy(with_system)
    merged = {"messages": [{"role": "user", "content": "Be brief.\n\nSpell river."},
                           {"role": "assistant", "content": "r,i,v,e,r"}]}
    assert tok.render_conversation(with_system) == tok.render_conversation(merged)
    assert with_system == before  # the caller's conversation is left alone


def test_truncation_keeps_the_prefix(tok):
    conversation = {"messages": [{"role": "user", "content": TEXT[:400]}, {"role": "assistant", "content": TEXT[:300]}]}
    ids, mask = tok.render_conversation(conversation)
    assert len(ids) > 50
    for n in (1, 7, 50, len(ids), len(ids) + 10):
        cut_ids, cut_mask = tok.render_conversation(conversation, max_tokens=n)
        assert cut_ids == ids[:n] and cut_mask == mask[:n]


def test_render_for_completion(tok):
    conversation = {"messages": [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "3+3?"},
        {"role": "assistant", "content": [{"type": "python", "text": "3+3"}, {"type": "python_output", "text": "6"}]},
    ]}
    before = copy.deepcopy(conversation)
    prompt = tok.render_for_completion(conversation)
    prefix, _ = tok.render_conversation({"messages": conversation["messages"][:3]})
    assert prompt == prefix + [sp(tok, "<|assistant_start|>")]
    assert conversation == before
    # a conversation that already ends with the user's turn (a live chat) gives the same prompt
    assert tok.render_for_completion({"messages": conversation["messages"][:3]}) == prompt
    # the prompt is never cut: a long question keeps its end
    long_question = {"messages": [{"role": "user", "content": TEXT}, {"role": "assistant", "content": "ok"}]}
    full, _ = tok.render_conversation({"messages": [{"role": "user", "content": TEXT}]}, max_tokens=None)
    assert tok.render_for_completion(long_question) == full + [sp(tok, "<|assistant_start|>")]


def test_visualize_marks_every_token(tok):
    ids, mask = tok.render_conversation({"messages": [{"role": "user", "content": "hi"},
                                                      {"role": "assistant", "content": "yo"}]})
    assert tok.visualize_tokenization(ids, mask).count("|") >= len(ids) - 1


@pytest.mark.parametrize("conversation, message", [
    ({"messages": []}, "no messages"),
    ([{"role": "user", "content": "hi"}], "dict"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, "message 0 is from 'assistant'"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, "message 1 is from 'user'"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                   {"role": "assistant", "content": "c"}]}, "message 2 is from 'assistant'"),
    ({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "a"},
                   {"role": "user", "content": "b"}]}, "message 2 is from 'user'"),
    ({"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}]},
     "message 1 must be from the user"),
    ({"messages": [{"role": "user", "content": ["a"]}]}, "message 0 (user) content must be a string"),
    ({"messages": [{"role": "user", "content": "a"},
                   {"role": "assistant", "content": [{"type": "image", "text": "x"}]}]},
     "message 1 (assistant) part 0"),
    ({"messages": [{"role": "user", "content": "a"},
                   {"role": "assistant", "content": [{"type": "text"}]}]}, "message 1 (assistant) part 0"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": 5}]},
     "message 1 (assistant) content"),
    ({"messages": [{"role": "user"}]}, "message 0 must be a dict with 'role' and 'content'"),
])
def test_bad_conversations_name_the_message(tok, conversation, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        tok.render_conversation(conversation)


def test_completion_prompt_of_a_bad_conversation_raises(tok):
    bad_part = {"messages": [{"role": "user", "content": "a"},
                             {"role": "assistant", "content": [{"type": "tool", "text": "x"}]},
                             {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}]}
    with pytest.raises(ValueError, match=re.escape("message 1 (assistant) part 0")):
        tok.render_for_completion(bad_part)
    out_of_order = {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}
    with pytest.raises(ValueError, match="message 1 is from 'user'"):
        tok.render_for_completion(out_of_order)
    with pytest.raises(ValueError, match="no messages"):
        tok.render_for_completion({"messages": [{"role": "assistant", "content": "a"}]})
