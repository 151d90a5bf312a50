import numpy as np
import pytest

from aiinfra.data.corpus import iter_documents, stdlib_root
from aiinfra.data.dataset import prepare_dataset, unigram_entropy_nats
from aiinfra.data.tokenizer import END_OF_TEXT, decode


def test_prepares_once_then_reuses_the_cache(small_corpus, tmp_path) -> None:
    first = prepare_dataset(str(small_corpus), 512, 0.2, tmp_path)
    assert len(first.train) > len(first.val) > 0
    eot = first.tokenizer.token_to_id(END_OF_TEXT)
    documents = list(iter_documents(str(small_corpus)))
    assert int((np.asarray(first.train) == eot).sum() + (np.asarray(first.val) == eot).sum()) == len(documents)
    # The first training document decodes back to its text exactly.
    first_doc_end = int(np.argmax(np.asarray(first.train) == eot))
    assert decode(first.tokenizer, first.train[:first_doc_end].tolist()) in {d.text for d in documents}
    mtime = (first.path / "train.bin").stat().st_mtime_ns
    second = prepare_dataset(str(small_corpus), 512, 0.2, tmp_path)
    assert second.path == first.path and (second.path / "train.bin").stat().st_mtime_ns == mtime


def test_changed_content_makes_a_new_cache_entry(small_corpus, tmp_path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for path in small_corpus.iterdir():
        (corpus / path.name).write_text(path.read_text())
    before = prepare_dataset(str(corpus), 512, 0.2, tmp_path / "cache")
    (corpus / "module_00.py").write_text("x = 1\n")
    after = prepare_dataset(str(corpus), 512, 0.2, tmp_path / "cache")
    assert after.path != before.path


def test_missing_corpus_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="nope"):
        prepare_dataset(str(tmp_path / "nope"), 512, 0.2, tmp_path)


def test_stdlib_corpus_is_present() -> None:
    names = [d.name for d in iter_documents("stdlib")]
    assert "os.py" in names and not any(n.startswith(("test/", "site-packages/")) for n in names)
    assert stdlib_root().is_dir()


def test_unigram_entropy() -> None:
    assert unigram_entropy_nats(np.array([0, 1, 2, 3]), 8) == pytest.approx(np.log(4))
    assert unigram_entropy_nats(np.array([5, 5, 5]), 8) == 0
