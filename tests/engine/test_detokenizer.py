import random

import pytest
from transformers import AutoTokenizer

from engine.detokenizer import IncrementalDetokenizer
from engine.sampling_params import SamplingParams

FFFD = "\ufffd"
PROMPT = "Write something:"


@pytest.fixture(scope="module")
def tok(default_model_path):
    return AutoTokenizer.from_pretrained(default_model_path.parent,
                                         gguf_file=default_model_path.name)


def stream(tok, ids, params=None, prompt_ids=None):
    """Feeds ids one by one; returns (detokenizer, deltas, stop, number of ids fed)."""
    params = params or SamplingParams()
    if prompt_ids is None:
        prompt_ids = tok.encode(PROMPT)
    det = IncrementalDetokenizer(tok, prompt_ids, params)
    deltas, stop, fed = [], None, 0
    for t in ids:
        fed += 1
        stop = det.append(t)
        deltas.append(det.get_delta(finished=stop is not None))
        if stop is not None:
            break
    if stop is None:
        deltas.append(det.get_delta(finished=True))
    return det, deltas, stop, fed


def test_emoji_and_cjk_split_across_tokens(tok):
    text = "Hi 😀! 世界你好, naïve café 🎉🎊 日本語のテキスト 👨‍👩‍👧 done 🤖."
    ids = tok.encode(text)
    partial = [t for t in ids if FFFD in tok.decode([t])]
    assert len(partial) >= 6  # the case is real: many tokens are pieces of a character
    det, deltas, stop, _ = stream(tok, ids)
    assert stop is None
    assert not any(FFFD in d for d in deltas)
    assert "".join(deltas) == det.output_text == tok.decode(ids) == text
    assert sum(1 for d in deltas if d) > 10  # streamed as it goes, not all at the end


@pytest.mark.parametrize("byte_share", [0.5, 1.0])
def test_random_ids_concatenate_to_full_decode(tok, byte_share):
    # Random pieces of characters, invalid bytes included: what a random-weight model emits.
    rng = random.Random(0)
    byte_tokens = [t for t in range(len(tok)) if FFFD in tok.decode([t])]
    for trial in range(100):
        ids = [rng.choice(byte_tokens) if rng.random() < byte_share else rng.randrange(len(tok))
               for _ in range(rng.randrange(1, 200))]
        det, deltas, _, _ = stream(tok, ids)
        expected = tok.decode(ids, skip_special_tokens=True)
        assert "".join(deltas) == det.output_text == expected, (trial, ids)


def test_pending_character_is_released_at_finish(tok):
    ids = tok.encode("ok 😀")
    head = ids[:-1]  # ends inside the emoji
    det = IncrementalDetokenizer(tok, tok.encode(PROMPT), SamplingParams())
    deltas = []
    for t in head:
        det.append(t)
        deltas.append(det.get_delta())
    assert not any(FFFD in d for d in deltas)
    assert det.output_text.endswith(FFFD)  # output so far, as decode() would show it
    deltas.append(det.get_delta(finished=True))
    assert "".join(deltas) == det.output_text == tok.decode(head)


def test_invalid_bytes_do_not_stall_the_stream(tok):
    lone = next(t for t in range(len(tok)) if tok.decode([t]) == FFFD and
                tok.decode([t, t]) == FFFD * 2)  # a continuation byte: never a character
    ids = tok.encode("a") + [lone] * 40 + tok.encode(" b")
    det, deltas, _, _ = stream(tok, ids)
    assert "".join(deltas[:30]).startswith("a" + FFFD)  # emitted before the end
    assert "".join(deltas) == det.output_text == tok.decode(ids)


def stop_across_tokens(tok, text):
    """A stop string made of the end of one token and the start of the next."""
    ids = tok.encode(text)
    pieces = [tok.decode([t]) for t in ids]
    for i in range(3, len(ids) - 1):
        a, b = pieces[i], pieces[i + 1]
        if len(a) >= 3 and len(b) >= 3 and FFFD not in a + b:
            stop = a[-2:] + b[:2]
            if stop not in text[:len("".join(pieces[:i + 1])) - 2]:
                return ids, i + 1, stop  # completed by token i + 1
    raise AssertionError("no suitable token pair")


def test_stop_string_spanning_tokens_is_detected_and_not_emitted(tok):
    text = "The quick brown fox jumps over the lazy dog and keeps running far away."
    ids, completing, stop = stop_across_tokens(tok, text)
    det, deltas, got, fed = stream(tok, ids, SamplingParams(stop=["zzz", stop]))
    assert got == stop and fed == completing + 1
    expected = text[:text.index(stop)]
    assert det.output_text == "".join(deltas) == expected
    assert stop not in "".join(deltas)
    assert sum(1 for d in deltas[:-1] if d) >= 2  # streaming went on before the stop


def test_include_stop_str_in_output(tok):
    text = "The quick brown fox jumps over the lazy dog and keeps running far away."
    ids, completing, stop = stop_across_tokens(tok, text)
    params = SamplingParams(stop=stop, include_stop_str_in_output=True)
    det, deltas, got, fed = stream(tok, ids, params)
    assert got == stop and fed == completing + 1
    expected = text[:text.index(stop) + len(stop)]
    assert det.output_text == "".join(deltas) == expected


def test_earliest_stop_wins_and_text_after_it_is_cut(tok):
    ids = tok.encode(" alpha beta gamma delta")
    det, deltas, got, _ = stream(tok, ids, SamplingParams(stop=["gamma", "beta gam", "a b"]))
    assert got == "a b"
    assert det.output_text == "".join(deltas) == " alph"
    with pytest.raises(RuntimeError):
        det.append(ids[0])


def test_stream_holds_back_a_possible_stop_start_until_finish(tok):
    ids = tok.encode(" counting one two three END")
    det = IncrementalDetokenizer(tok, tok.encode(PROMPT), SamplingParams(stop=["ENDING"]))
    streamed = ""
    for t in ids:
        assert det.append(t) is None
        streamed += det.get_delta()
        assert len(det.output_text) - len(streamed) <= len("ENDING") - 1
    assert det.output_text == " counting one two three END"
    assert streamed == det.output_text[:-5]  # " END" could still grow into "ENDING"
    assert det.get_delta(finished=True) == det.output_text[-5:]
    assert det.get_delta(finished=True) == ""


def test_stop_strings_wait_for_min_tokens(tok):
    ids = tok.encode(" stop here, then stop again")
    det, deltas, got, fed = stream(tok, ids, SamplingParams(stop="stop", min_tokens=3))
    assert got == "stop" and fed == len(tok.encode(" stop here, then stop"))
    assert det.output_text == "".join(deltas) == " stop here, then "


@pytest.mark.parametrize("skip", [True, False])
def test_skip_special_tokens(tok, skip):
    ids = tok.encode(" Hello") + [tok.eos_token_id] + tok.encode(" there")
    det, deltas, _, _ = stream(tok, ids, SamplingParams(skip_special_tokens=skip))
    special = tok.decode([tok.eos_token_id])
    assert special.startswith("<|")
    expected = " Hello there" if skip else f" Hello{special} there"
    assert "".join(deltas) == det.output_text == expected


def test_prompt_ending_inside_a_character(tok):
    emoji = tok.encode("😀")
    assert len(emoji) > 1
    ids = emoji[1:] + tok.encode(" fine")
    det, deltas, _, _ = stream(tok, ids, prompt_ids=tok.encode(PROMPT) + emoji[:1])
    assert "".join(deltas) == det.output_text == tok.decode(ids)


class CountingTokenizer:
    """Records the longest id list ever decoded."""
    def __init__(self, tok):
        self.tok, self.longest = tok, 0

    def decode(self, ids, **kwargs):
        self.longest = max(self.longest, len(ids))
        return self.tok.decode(ids, **kwargs)


def test_cost_per_token_does_not_grow_with_the_output(tok):
    ids = tok.encode("Long output with emoji 😀 and 世界. " * 200)
    counting = CountingTokenizer(tok)
    det, deltas, _, _ = stream(counting, ids, SamplingParams(stop=["never appears"]),
                               prompt_ids=tok.encode(PROMPT))
    assert len(ids) > 2000
    assert counting.longest <= 16
    assert "".join(deltas) == det.output_text == tok.decode(ids)
