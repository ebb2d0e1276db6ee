"""Byte tokenizer and the deterministic, resumable batch pipeline."""

import numpy as np
import pytest

from jaxlib_ext import data


def test_encode_decode_round_trip():
    text = "def f(x):\n    return x + 1  # é ✓\n"
    tokens = data.encode(text)
    assert tokens.dtype == np.uint8 and tokens.max() < data.VOCAB_SIZE
    assert data.decode(tokens) == text
    assert data.decode([0xFF]) == "\ufffd"


def test_stdlib_corpus_is_real_python_source():
    files = data.stdlib_source_files()
    assert len(files) > 100 and all(f.suffix == ".py" for f in files)
    corpus = data.load_corpus(max_bytes=1 << 20)
    assert corpus.size == 1 << 20
    assert b"def " in corpus.tobytes() and b"import " in corpus.tobytes()


def test_user_file_and_directory(tmp_path):
    (tmp_path / "a.txt").write_text("alpha " * 10)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("beta " * 10)
    assert data.decode(data.load_corpus(tmp_path / "a.txt")) == "alpha " * 10
    assert data.decode(data.load_corpus(tmp_path)) == "alpha " * 10 + "beta " * 10
    assert data.load_corpus(tmp_path, max_bytes=7).size == 7


def test_missing_and_empty_data(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        data.load_corpus(tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="empty"):
        data.load_corpus(tmp_path / "empty.txt")
    with pytest.raises(ValueError, match="max_bytes"):
        data.load_corpus(max_bytes=0)


TOKENS = np.arange(1001, dtype=np.int64).astype(np.uint8)


def _run(batches, state, n):
    out = []
    for _ in range(n):
        batch, state = batches.batch(state)
        out.append(batch)
    return out, state


def test_windows_are_consecutive_text():
    tokens = np.random.default_rng(0).integers(0, 256, 5001).astype(np.uint8)
    batches = data.TokenBatches(tokens, batch_size=4, seq_len=10)
    batch, _ = batches.batch(batches.initial_state(0))
    assert batch.shape == (4, 11) and batch.dtype == np.int32
    for row in batch:
        starts = [s for s in range(0, 5001 - 10, 10) if np.array_equal(tokens[s : s + 11], row)]
        assert starts, "every row is a window of the corpus"


def test_same_seed_same_batches_other_seed_other_batches():
    batches = data.TokenBatches(TOKENS, batch_size=4, seq_len=10)
    a, _ = _run(batches, batches.initial_state(7), 5)
    b, _ = _run(data.TokenBatches(TOKENS, batch_size=4, seq_len=10), data.DataState(7), 5)
    c, _ = _run(batches, batches.initial_state(8), 5)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_resume_from_a_saved_position_continues_exactly():
    batches = data.TokenBatches(TOKENS, batch_size=4, seq_len=10)
    straight, _ = _run(batches, batches.initial_state(1), 60)  # crosses epochs (100 windows)
    first, state = _run(batches, batches.initial_state(1), 35)
    saved = state.to_dict()
    fresh = data.TokenBatches(TOKENS, batch_size=4, seq_len=10)
    rest, _ = _run(fresh, data.DataState.from_dict(saved), 25)
    assert all(np.array_equal(x, y) for x, y in zip(straight, first + rest, strict=True))


def test_each_window_once_per_epoch():
    batches = data.TokenBatches(TOKENS, batch_size=4, seq_len=10)  # 100 windows: 25 batches
    out, state = _run(batches, batches.initial_state(0), 25)
    starts = sorted(int(b[0]) for batch in out for b in batch)
    assert len(set(starts)) == 100 and state.epoch == 0
    _, state = _run(batches, state, 1)
    assert (state.epoch, state.index) == (1, 4)


def test_bad_shapes():
    with pytest.raises(ValueError, match="fewer than batch_size"):
        data.TokenBatches(TOKENS, batch_size=200, seq_len=10)
    with pytest.raises(ValueError, match="must be >= 1"):
        data.TokenBatches(TOKENS, batch_size=0, seq_len=10)
