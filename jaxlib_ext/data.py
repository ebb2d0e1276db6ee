"""Byte-level tokenizer and a deterministic, resumable batch pipeline over a real text corpus.

The default corpus is the Python standard library's own source files: real text that exists on
every machine with Python, so nothing is downloaded. A user's file or directory works the same way.

The pipeline is a pure function of ``(seed, position)``: :meth:`TokenBatches.batch` maps a
:class:`DataState` to a batch and the next state, so a checkpoint that stores the state (three
integers, JSON-ready) resumes exactly where training stopped, on any number of processes.
"""

from __future__ import annotations

import dataclasses
import sysconfig
from collections.abc import Sequence
from pathlib import Path

import numpy as np

VOCAB_SIZE = 256
"""Byte-level: token ``i`` is the byte ``i``."""


def encode(text: str) -> np.ndarray:
    """UTF-8 bytes of ``text`` as a ``uint8`` token array."""
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).copy()


def decode(tokens: Sequence[int] | np.ndarray) -> str:
    """The text of byte tokens (invalid UTF-8 sequences become U+FFFD)."""
    return bytes(np.asarray(tokens, dtype=np.uint8).tolist()).decode("utf-8", errors="replace")


def stdlib_source_files() -> list[Path]:
    """The standard library's ``*.py`` files (tests and site-packages excluded), sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(
        p
        for p in root.rglob("*.py")
        if "site-packages" not in p.parts and "test" not in p.parts and "tests" not in p.parts
    )


def load_corpus(path: str | Path | None = None, *, max_bytes: int | None = 16 << 20) -> np.ndarray:
    """Loads a corpus as byte tokens.

    Args:
      path: a text file, a directory (its files are read recursively in sorted order), or None
        for the Python standard library's source files.
      max_bytes: stop after this many bytes (None: everything).

    Returns:
      A ``uint8`` array of tokens.

    Raises:
      FileNotFoundError: ``path`` does not exist.
      ValueError: the corpus is empty or ``max_bytes`` is not positive.
    """
    if max_bytes is not None and max_bytes < 1:
        raise ValueError(f"`max_bytes` must be positive or None, got {max_bytes=}")
    if path is None:
        files = stdlib_source_files()
        source = "the Python standard library"
    else:
        root = Path(path)
        if not root.exists():
            raise FileNotFoundError(f"data file or directory not found: {str(root)!r}")
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        source = str(root)
    chunks, total = [], 0
    for file in files:
        data = file.read_bytes()
        if max_bytes is not None:
            data = data[: max_bytes - total]
        chunks.append(data)
        total += len(data)
        if max_bytes is not None and total >= max_bytes:
            break
    tokens = np.frombuffer(b"".join(chunks), dtype=np.uint8).copy()
    if tokens.size < 2:
        raise ValueError(f"the corpus from {source} is empty (or one byte)")
    return tokens


@dataclasses.dataclass(frozen=True)
class DataState:
    """Where the pipeline is: the next batch is window ``index`` of epoch ``epoch``'s order."""

    seed: int
    epoch: int = 0
    index: int = 0

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> DataState:
        return cls(int(d["seed"]), int(d["epoch"]), int(d["index"]))


class TokenBatches:
    """Random windows of ``seq_len + 1`` tokens, each window once per epoch, in a seeded order.

    Window ``w`` starts at token ``w * seq_len``, so consecutive windows share one token (the last
    target of one is the first input of the next) and together they cover the corpus. Each epoch
    visits them in the order ``np.random.default_rng((seed, epoch)).permutation``; a batch never
    spans two epochs (the tail that does not fill a batch is skipped).

    Example:
      >>> batches = TokenBatches(encode("hello world, " * 100), batch_size=4, seq_len=8)
      >>> state = batches.initial_state(seed=0)
      >>> batch, state = batches.batch(state)
      >>> batch.shape, batch.dtype, state.index
      ((4, 9), dtype('int32'), 4)
    """

    def __init__(self, tokens: np.ndarray, *, batch_size: int, seq_len: int):
        if batch_size < 1 or seq_len < 1:
            raise ValueError(
                f"`batch_size` and `seq_len` must be >= 1, got {batch_size=}, {seq_len=}"
            )
        self.tokens = np.asarray(tokens, dtype=np.uint8)
        self.batch_size, self.seq_len = batch_size, seq_len
        self.num_windows = (self.tokens.size - 1) // seq_len
        if self.num_windows < batch_size:
            raise ValueError(
                f"the corpus has {self.tokens.size} tokens: {self.num_windows} windows of "
                f"seq_len={seq_len}, fewer than batch_size={batch_size}"
            )
        self._order_epoch = -1
        self._order_seed = -1
        self._order = np.empty(0, np.int64)

    def initial_state(self, seed: int) -> DataState:
        return DataState(int(seed))

    def _permutation(self, seed: int, epoch: int) -> np.ndarray:
        if (seed, epoch) != (self._order_seed, self._order_epoch):
            rng = np.random.default_rng((seed, epoch))
            self._order = rng.permutation(self.num_windows)
            self._order_seed, self._order_epoch = seed, epoch
        return self._order

    def batch(self, state: DataState) -> tuple[np.ndarray, DataState]:
        """The global batch ``[batch_size, seq_len + 1]`` (int32) at ``state``; the next state."""
        epoch, index = state.epoch, state.index
        if index + self.batch_size > self.num_windows:
            epoch, index = epoch + 1, 0
        windows = self._permutation(state.seed, epoch)[index : index + self.batch_size]
        starts = windows * self.seq_len
        batch = self.tokens[starts[:, None] + np.arange(self.seq_len + 1)[None, :]]
        return batch.astype(np.int32), DataState(state.seed, epoch, index + self.batch_size)
