"""TextStream, one generation row's text and stop conditions: stop strings cut the text (across token boundaries
too), a tail that could still become a stop string is held back until the row ends or moves past it, an incomplete
multi-byte character is never handed out, stop tokens and EOS end the row without their own text; and the result
builders."""

from __future__ import annotations

import pytest
import torch

from service.runtime import FinishReason, RowOutput, SamplingParams, TextStream
from service.runtime.output import class_probabilities, classification_result, generation_result
from tests.models import BYTE_EOS, byte_tokenizer, tiny_tokenizer

EOS = 1  # tiny_tokenizer's <eos>


@pytest.fixture(scope="module")
def words():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def raw_bytes():
    return byte_tokenizer()


def push_all(stream: TextStream, ids: list[int]) -> list[tuple[str, FinishReason | None]]:
    """Pushes tokens until the row ends; (delta, finish) per token."""
    out = []
    for i in ids:
        out.append(stream.push(i))
        if out[-1][1] is not None:
            break
    return out


def word_ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def test_a_tail_that_could_start_a_stop_string_is_held_back_until_the_row_ends(words):
    """stop "w7 w8" (5 characters): the last 4 characters of the text wait; at the length limit all of it comes."""
    ids = word_ids(words, "w5 w6 w7 w9")
    stream = TextStream(words, SamplingParams(max_new_tokens=4, stop=["w7 w8"]), {EOS})
    got = push_all(stream, ids)
    # text after each token: "w5", "w5 w6", "w5 w6 w7", "w5 w6 w7 w9" (then the limit: nothing held)
    assert got == [("", None), ("w", None), ("5 w", None), ("6 w7 w9", FinishReason.LENGTH)]
    assert "".join(d for d, _ in got) == words.decode(ids)


def test_a_stop_string_across_token_boundaries_cuts_the_text_before_it(words):
    """ "6 w7" starts inside token w6 and ends inside w7: the row stops at w7, its text ends before the "6"."""
    ids = word_ids(words, "w5 w6 w7 w8")
    stream = TextStream(words, SamplingParams(max_new_tokens=10, stop=["6 w7"]), {EOS})
    got = push_all(stream, ids)
    assert [f for _, f in got] == [None, None, FinishReason.STOP], "stopped at the token that completed it"
    assert "".join(d for d, _ in got) == "w5 w"
    assert stream.token_ids == ids[:3]


def test_the_earliest_of_several_stop_strings_wins_and_held_text_is_never_handed_out_twice(raw_bytes):
    ids = raw_bytes("xabcdz", add_special_tokens=False)["input_ids"]
    stream = TextStream(raw_bytes, SamplingParams(max_new_tokens=20, stop=["cd", "bcx", "d"]), {BYTE_EOS})
    got = push_all(stream, ids)
    # hold = len("bcx") - 1 = 2 characters; "d" completes both "cd" (at 3) and "d" (at 4): the earlier cut wins
    assert got == [("", None), ("", None), ("x", None), ("a", None), ("b", FinishReason.STOP)]


def test_a_near_miss_is_released_once_the_text_moves_past_it(raw_bytes):
    """ "ab" could become "abc"; when "x" follows instead, the held characters come out (still minus the hold)."""
    ids = raw_bytes("abxyz", add_special_tokens=False)["input_ids"]
    stream = TextStream(raw_bytes, SamplingParams(max_new_tokens=20, stop=["abc"]), {BYTE_EOS})
    deltas = [d for d, _ in push_all(stream, ids)]
    assert deltas == ["", "", "a", "b", "x"]
    assert stream.emitted == 3


def test_no_stop_strings_means_no_hold_back(raw_bytes):
    ids = raw_bytes("abc", add_special_tokens=False)["input_ids"]
    stream = TextStream(raw_bytes, SamplingParams(max_new_tokens=20), {BYTE_EOS})
    assert push_all(stream, ids) == [("a", None), ("b", None), ("c", None)]


def test_an_incomplete_multibyte_character_waits_for_its_last_byte(raw_bytes):
    ids = raw_bytes("aé€", add_special_tokens=False)["input_ids"]
    assert len(ids) == 1 + 2 + 3
    stream = TextStream(raw_bytes, SamplingParams(max_new_tokens=20), {BYTE_EOS})
    assert [d for d, _ in push_all(stream, ids)] == ["a", "", "é", "", "", "€"]


def test_stop_tokens_and_eos_end_the_row_without_their_text(words):
    w5, w6, w9 = word_ids(words, "w5 w6 w9")
    stream = TextStream(words, SamplingParams(max_new_tokens=10, stop_token_ids=[w9]), {EOS})
    assert push_all(stream, [w5, w6, w9]) == [("w5", None), (" w6", None), ("", FinishReason.STOP)]
    stream = TextStream(words, SamplingParams(max_new_tokens=10), {EOS})
    assert push_all(stream, [w5, EOS]) == [("w5", None), ("", FinishReason.STOP)]
    stream = TextStream(words, SamplingParams(max_new_tokens=2, ignore_eos=True), {EOS})
    assert [f for _, f in push_all(stream, [w5, EOS])] == [None, FinishReason.LENGTH], "ignore_eos: EOS is a token"
    assert stream.stop_ids == set()


def test_without_a_tokenizer_only_the_stop_conditions_apply():
    stream = TextStream(None, SamplingParams(max_new_tokens=3, stop=["x"], stop_token_ids=[7]), {2})
    assert push_all(stream, [5, 6, 9]) == [("", None), ("", None), ("", FinishReason.LENGTH)]
    stream = TextStream(None, SamplingParams(max_new_tokens=3), {2})
    assert push_all(stream, [5, 2]) == [("", None), ("", FinishReason.STOP)]


# -- results -------------------------------------------------------------------------------------------------------
def test_generation_result_joins_the_rows_outputs():
    outs = [
        RowOutput("r", 1, token_id=5, text="w5", logprob=-0.5, top_logprobs=[(5, -0.5)], prompt_logprobs=[None]),
        RowOutput(
            "r", 2, token_id=6, text=" w6", logprob=-1.5, top_logprobs=[(7, -1.0)], finish_reason=FinishReason.STOP
        ),
    ]
    res = generation_result("t", 3, 4, outs, logprobs=True)
    assert (res.task, res.version, res.token_ids, res.text, res.finish_reason) == ("t", 3, [5, 6], "w5 w6", "stop")
    assert res.prompt_tokens == 4 and res.completion_tokens == 2
    assert res.logprobs == [-0.5, -1.5] and res.top_logprobs == [[(5, -0.5)], [(7, -1.0)]]
    assert res.prompt_logprobs == [None]
    assert generation_result("t", 3, 4, outs, logprobs=False).logprobs is None


def test_class_probabilities_and_the_label_of_a_classification():
    probs = class_probabilities(torch.tensor([0.0, 2.0, 1.0]))
    want = torch.softmax(torch.tensor([0.0, 2.0, 1.0]), 0).tolist()
    assert probs == pytest.approx(want, abs=1e-7) and sum(probs) == pytest.approx(1.0)
    res = classification_result("t", 2, ["a", "b", "c"], RowOutput("r", 1, probs=probs))
    assert res.label == "b" and res.scores == dict(zip(["a", "b", "c"], probs))
