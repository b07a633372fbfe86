import pytest

from engine.detokenizer import IncrementalDetokenizer

TEXTS = [
    "Hello, world! This is a plain sentence.",
    "Multi-byte: héllo wörld, 日本語のテキスト, emoji 🎉🚀 and ∑ symbols.",
    "  leading spaces\nnew lines\ttabs  and trailing  ",
    "def f(x):\n    return x ** 2  # code",
]


def stream(tokenizer, ids, **kwargs):
    d = IncrementalDetokenizer(tokenizer.hf, **kwargs)
    deltas, stop = [], None
    for t in ids:
        stop = d.add_token(t)
        deltas.append(d.take_delta(finished=stop is not None))
        if stop is not None:
            break
    d.finish()
    deltas.append(d.take_delta(finished=True))
    return d, deltas, stop


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_text_equals_whole_decode_and_never_breaks_a_character(default_tokenizer, text):
    ids = default_tokenizer.encode(text, add_special_tokens=False)
    d, deltas, _ = stream(default_tokenizer, ids)
    assert "".join(deltas) == default_tokenizer.hf.decode(ids, skip_special_tokens=True,
                                                          clean_up_tokenization_spaces=False)
    assert "".join(deltas) == text
    assert all("\ufffd" not in delta for delta in deltas)


def test_a_multibyte_character_split_across_tokens_streams_whole(default_tokenizer):
    ids = default_tokenizer.encode("🎉", add_special_tokens=False)
    assert len(ids) > 1, "the emoji should span several byte-level tokens"
    _, deltas, _ = stream(default_tokenizer, ids)
    assert [x for x in deltas if x] == ["🎉"]


def test_stop_string_split_across_tokens_is_found_and_cut(default_tokenizer):
    text = "The answer is forty-two. END OF ANSWER and then more words."
    ids = default_tokenizer.encode(text, add_special_tokens=False)
    stop_text = "END OF"
    d, deltas, stop = stream(default_tokenizer, ids, stop=(stop_text,))
    assert stop == stop_text
    assert "".join(deltas) == "The answer is forty-two. "
    d, deltas, stop = stream(default_tokenizer, ids, stop=(stop_text,), include_stop_str_in_output=True)
    assert "".join(deltas) == "The answer is forty-two. END OF"


def test_text_that_may_start_a_stop_string_is_held_back(default_tokenizer):
    ids = default_tokenizer.encode("abc STO", add_special_tokens=False)
    d = IncrementalDetokenizer(default_tokenizer.hf, stop=("STOP",))
    streamed = ""
    for t in ids:
        assert d.add_token(t) is None
        streamed += d.take_delta(finished=False)
    assert "STO" not in streamed and "abc STO".startswith(streamed)
    d.finish()
    assert streamed + d.take_delta(finished=True) == "abc STO"
