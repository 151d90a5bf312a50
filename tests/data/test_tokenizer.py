from hypothesis import given, settings
from hypothesis import strategies as st

from aiinfra.data.tokenizer import END_OF_TEXT, decode, encode, load_tokenizer, train_tokenizer

TRAINING_TEXT = ["def add(a, b):\n    return a + b\n", "class Point:\n    x: int = 0\n", "héllo wörld 世界 🙂\n"] * 20
TOKENIZER = train_tokenizer(TRAINING_TEXT, vocab_size=400)


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_round_trips_arbitrary_text(text: str) -> None:
    assert decode(TOKENIZER, encode(TOKENIZER, text)) == text


def test_learns_merges_and_keeps_special_token_text_plain(tmp_path) -> None:
    ids = encode(TOKENIZER, "def add(a, b):")
    assert len(ids) < len("def add(a, b):")  # merges were learned
    TOKENIZER.save(str(tmp_path / "tokenizer.json"))
    reloaded = load_tokenizer(tmp_path / "tokenizer.json")
    text = f"a {END_OF_TEXT} b"
    assert reloaded.token_to_id(END_OF_TEXT) not in encode(reloaded, text)
    assert decode(reloaded, encode(reloaded, text)) == text
