"""Incremental detokenization and stop strings."""

from aiinfra.data.tokenizer import decode, encode, train_tokenizer
from aiinfra.serve.async_engine import Detokenizer

TEXT = "naïve café: 日本語 ✓ — def f(x): return x  # done\n"


def stream(detokenizer: Detokenizer, ids: list[int]) -> tuple[list[str], bool]:
    pieces, stopped = [], False
    for index, token in enumerate(ids):
        piece, stopped = detokenizer.add([token], final=index == len(ids) - 1)
        pieces.append(piece)
        if stopped:
            break
    return pieces, stopped


def test_token_by_token_text_equals_the_whole_decode_and_never_splits_a_character() -> None:
    tokenizer = train_tokenizer(["def f(x): return x\n"] * 10, 270)  # too small to hold the accents as tokens
    ids = encode(tokenizer, TEXT)
    pieces, stopped = stream(Detokenizer(tokenizer, []), ids)
    assert "".join(pieces) == decode(tokenizer, ids) == TEXT and not stopped
    assert not any("\ufffd" in piece for piece in pieces)


def test_stop_strings_cut_before_the_match_even_across_tokens() -> None:
    tokenizer = train_tokenizer(["def f(x): return x\n"] * 10, 270)
    ids = encode(tokenizer, TEXT)
    pieces, stopped = stream(Detokenizer(tokenizer, ["ret", "日本"]), ids)
    assert stopped and "".join(pieces) == TEXT[: TEXT.index("日本")]
    pieces, stopped = stream(Detokenizer(tokenizer, ["no such text"]), ids)
    assert not stopped and "".join(pieces) == TEXT
