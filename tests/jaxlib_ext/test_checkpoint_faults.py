"""Fault injection: every file of a saved step flipped, truncated or deleted in turn, and targeted
manifest edits. Each trial ends in exact values or a typed error that ``fallback`` handles; never
wrong values, never an untyped exception.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax.numpy as jnp
import pytest

from jaxlib_ext import checkpoint as C
from jaxlib_ext.checkpoint.manifest import manifest_checksum
from tests.jaxlib_ext.checkpoint_states import abstract, small_state
from tests.jaxlib_ext.states import assert_same_state

EXTRA = {1: {"data": {"index": 16}}, 2: {"data": {"index": 32}}}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """Steps 1 and 2 of :func:`small_state`, saved once for the whole module."""
    directory = tmp_path_factory.mktemp("pristine") / "ckpt"
    with C.Checkpointer(directory, async_save=False) as ckpt:
        for step in (1, 2):
            ckpt.save(step, small_state(step), extra=EXTRA[step])
    return directory


def _files(step_dir: Path) -> list[Path]:
    return sorted(p for p in step_dir.rglob("*") if p.is_file())


def _damage(path: Path, how: str) -> None:
    raw = bytearray(path.read_bytes())
    if how == "flip_byte":
        raw[len(raw) // 2] ^= 0xFF
    elif how == "flip_bit":
        raw[-1] ^= 0x01
    elif how == "truncate":
        raw = raw[: len(raw) // 2]
    if how == "delete":
        path.unlink()
    else:
        path.write_bytes(bytes(raw))


def _outcome(ckpt: C.Checkpointer, **kwargs) -> tuple[str, int | None]:
    """``("values", step)`` when the restore returned exactly a saved step's values and extra,
    ``("corrupt", None)`` for a :class:`CorruptCheckpointError`; anything else fails."""
    target = abstract(small_state(0))
    try:
        state, extra = ckpt.restore(target, **kwargs)
    except C.CorruptCheckpointError:
        return "corrupt", None
    step = int(state["step"])
    assert step in (1, 2), step
    assert_same_state(state, small_state(step))
    assert extra == EXTRA[step]
    return "values", step


FILES = [
    "_CHECKPOINT_METADATA",
    "commit_success.txt",
    "manifest/metadata",
    "manifest/commit_success.txt",
    "arrays/_METADATA",
    "arrays/_sharding",
    "arrays/manifest.ocdbt",
    "arrays/array_metadatas/process_0",
    "arrays/commit_success.txt",
]


def test_the_step_has_the_files_the_trials_name(pristine):
    names = {str(p.relative_to(pristine / "2")) for p in _files(pristine / "2")}
    assert set(FILES) <= names, names
    assert any("/d/" in n for n in names), "data files under d/"


@pytest.mark.parametrize("how", ["flip_byte", "flip_bit", "truncate", "delete"])
def test_every_file_of_a_step_damaged_in_turn(pristine, tmp_path, how):
    outcomes = {}
    for index, file in enumerate(_files(pristine / "2")):
        directory = tmp_path / str(index)
        shutil.copytree(pristine, directory)
        name = str(file.relative_to(pristine / "2"))
        _damage(directory / "2" / name, how)
        with C.Checkpointer(directory) as ckpt:
            kind, step = _outcome(ckpt)
            if kind == "values" and step == 1:  # only when step 2 is no longer listed
                assert ckpt.steps() == [1], (name, ckpt.steps())
            assert _outcome(ckpt, fallback=True)[0] == "values", name
        outcomes[name] = (kind, step)
        shutil.rmtree(directory)
    # The manifest fails its checksum however it is damaged; without it the step is not listed.
    expected = ("values", 1) if how == "delete" else ("corrupt", None)
    assert outcomes["manifest/metadata"] == expected
    data = [v for k, v in outcomes.items() if "/d/" in k]
    assert ("corrupt", None) in data, outcomes


def _edit_manifest(directory: Path, step: int, edit, *, rechecksum: bool = False) -> None:
    path = directory / str(step) / "manifest" / "metadata"
    info = json.loads(path.read_text())
    edit(info)
    if rechecksum:
        info["manifest_checksum"] = manifest_checksum(info)
    path.write_text(json.dumps(info))


def _set_index(info):
    info["extra"]["data"]["index"] = 33


def _widen_stored_shape(info):
    info["leaves"]["params/w"]["stored_shape"] = [16, 9]


def _change_stored_dtype(info):
    info["leaves"]["params/w"]["stored_dtype"] = "float16"


def _rename_leaf(info):
    info["leaves"]["params/v"] = info["leaves"].pop("params/w")


@pytest.mark.parametrize(
    "edit", [_set_index, _widen_stored_shape, _change_stored_dtype, _rename_leaf]
)
def test_an_edited_manifest_is_corrupt_and_fallback_handles_it(pristine, tmp_path, edit):
    """One changed field (the data position in ``extra``, a leaf's stored shape, dtype or key) is
    caught by the manifest's checksum, also with ``init=``: it never comes back as data, nor
    silently from ``init``."""
    directory = shutil.copytree(pristine, tmp_path / "ckpt")
    _edit_manifest(directory, 2, edit)
    with C.Checkpointer(directory) as ckpt:
        target = abstract(small_state(0))
        with pytest.raises(C.CorruptCheckpointError, match="step 2: manifest .* checksum"):
            ckpt.restore(target)
        with pytest.raises(C.CorruptCheckpointError, match="step 2"):
            ckpt.restore(target, init=small_state(0))
        with pytest.raises(C.CorruptCheckpointError):
            ckpt.plan(target)
        assert _outcome(ckpt, fallback=True) == ("values", 1)
        assert _outcome(ckpt, fallback=True, init=small_state(0)) == ("values", 1)


@pytest.mark.parametrize(
    ("damage", "error"),
    [
        (lambda text: b"\xff\xfe" + text.encode(), "UnicodeDecodeError"),
        (lambda text: text.replace('"leaves"', '"leafs"').encode(), "checksum"),
        (
            lambda text: text.replace('"stored_dtype": "float32"', '"stored_dtype": 7').encode(),
            "checksum",
        ),
        (lambda text: b"[]", "not a jaxlib-ext-checkpoint/2 manifest"),
        (lambda text: b"", "JSONDecodeError"),
    ],
)
def test_an_unreadable_manifest_is_a_typed_error(pristine, tmp_path, damage, error):
    directory = shutil.copytree(pristine, tmp_path / "ckpt")
    path = directory / "2" / "manifest" / "metadata"
    path.write_bytes(damage(path.read_text()))
    with pytest.raises(C.CorruptCheckpointError, match=error):
        C.manifest(directory)
    with C.Checkpointer(directory) as ckpt:
        with pytest.raises(C.CorruptCheckpointError, match="step 2"):
            ckpt.restore(abstract(small_state(0)))
        assert _outcome(ckpt, fallback=True) == ("values", 1)


@pytest.mark.parametrize(
    "edit",
    [
        lambda info: info["leaves"]["params/w"].pop("stored_dtype"),
        lambda info: info.update(leaves=[1, 2]),
        lambda info: info.update(step=3),
    ],
)
def test_a_malformed_manifest_with_a_matching_checksum_is_corrupt(pristine, tmp_path, edit):
    """A manifest rewritten by hand with its checksum recomputed: the fields a restore reads are
    still checked (no KeyError or TypeError escapes)."""
    directory = shutil.copytree(pristine, tmp_path / "ckpt")
    _edit_manifest(directory, 2, edit, rechecksum=True)
    with pytest.raises(C.CorruptCheckpointError, match="step 2: manifest .* malformed"):
        C.manifest(directory)
    with C.Checkpointer(directory) as ckpt:
        assert _outcome(ckpt, fallback=True) == ("values", 1)


def test_a_legacy_manifest_without_checksum_is_read_with_a_warning(pristine, tmp_path, caplog):
    directory = shutil.copytree(pristine, tmp_path / "ckpt")

    def legacy(info):
        info["format"] = "jaxlib-ext-checkpoint/1"
        del info["manifest_checksum"]

    _edit_manifest(directory, 2, legacy)
    with C.Checkpointer(directory) as ckpt:
        assert _outcome(ckpt) == ("values", 2)
    assert "predates manifest checksums" in caplog.text


def test_a_manifest_records_how_to_read_it_without_the_library(pristine):
    reading = C.manifest(pristine)["reading"]
    assert "flat dict" in reading and "split the keys on '/'" in reading
    assert len(C.manifest(pristine)["manifest_checksum"]) == 64
    assert jnp.dtype(C.manifest(pristine)["leaves"]["rng"]["stored_dtype"]) == jnp.uint32
