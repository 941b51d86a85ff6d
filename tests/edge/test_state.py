"""Persistent device state: the residual and counters survive a restart, and a bad file is refused."""
from __future__ import annotations

import io
import json
import os
import zipfile

import numpy as np
import pytest

from pqsu.edge.state import DeviceState, StateError
from pqsu.protocol.errors import PqsuError

UNPICKLED: list[str] = []


class _Marker:
    """Would record itself if a loader ever unpickled it."""

    def __reduce__(self):
        return (UNPICKLED.append, ("unpickled",))


def _state() -> DeviceState:
    rng = np.random.default_rng(0)
    return DeviceState(
        residual={"features.0.weight": rng.normal(size=(4, 1, 3, 3)).astype(np.float32),
                  "classifier.2.bias": rng.normal(size=10).astype(np.float32)},
        previous={"features.0.weight": rng.normal(size=(4, 1, 3, 3)).astype(np.float32)},
        last_uploaded_loss=0.4321, last_round=17, rounds_joined=12, uploads=9, bytes_up=123_456,
        bytes_down=7_890_123)


def _assert_same(a: DeviceState, b: DeviceState) -> None:
    for part in ("residual", "previous"):
        x, y = getattr(a, part), getattr(b, part)
        assert set(x) == set(y)
        for k in x:
            assert x[k].dtype == y[k].dtype and x[k].shape == y[k].shape
            np.testing.assert_array_equal(x[k], y[k])
    for k in ("last_uploaded_loss", "last_round", "rounds_joined", "uploads", "bytes_up", "bytes_down"):
        assert getattr(a, k) == getattr(b, k), k


def test_save_load_round_trip(tmp_path):
    path = tmp_path / "state.npz"
    state = _state()
    state.save(path)
    _assert_same(DeviceState.load(path), state)


def test_round_trip_of_a_state_that_never_uploaded(tmp_path):
    path = tmp_path / "state.npz"
    DeviceState(last_round=0, rounds_joined=1, bytes_down=99).save(path)
    loaded = DeviceState.load(path)
    assert loaded.last_uploaded_loss is None and loaded.residual == {} and loaded.previous == {}
    assert (loaded.last_round, loaded.rounds_joined, loaded.bytes_down) == (0, 1, 99)


def test_save_creates_folders_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "var" / "lib" / "pqsu" / "state.npz"
    state = _state()
    for rnd in range(3):
        state.last_round = rnd
        state.save(path)
    assert sorted(os.listdir(path.parent)) == ["state.npz"]
    assert DeviceState.load(path).last_round == 2


def test_a_failed_save_keeps_the_old_file_and_cleans_up(tmp_path, monkeypatch):
    path = tmp_path / "state.npz"
    old = _state()
    old.save(path)
    new = _state()
    new.last_round = 99
    new.residual = {"other": np.ones(3, np.float32)}

    def crash(src, dst):  # the power goes out between writing the temp file and renaming it
        raise OSError("simulated crash before rename")

    with monkeypatch.context() as m:
        m.setattr(os, "replace", crash)
        with pytest.raises(OSError, match="simulated crash"):
            new.save(path)
    assert sorted(os.listdir(tmp_path)) == ["state.npz"]
    _assert_same(DeviceState.load(path), old)


def test_missing_file_gives_a_fresh_state(tmp_path):
    loaded = DeviceState.load(tmp_path / "nothing-here.npz")
    _assert_same(loaded, DeviceState())
    assert loaded.last_round == -1 and loaded.last_uploaded_loss is None


@pytest.mark.parametrize("content", [b"this is not a state file\n" * 4, b"\x93NUMPY garbage"])
def test_corrupt_file_raises_state_error_with_a_message(tmp_path, content):
    path = tmp_path / "state.npz"
    path.write_bytes(content)
    with pytest.raises(StateError) as info:
        DeviceState.load(path)
    assert isinstance(info.value, PqsuError)
    assert str(path) in str(info.value) and "unreadable" in str(info.value)


@pytest.mark.parametrize("cut", ["empty", "half", "tail"])
def test_truncated_or_empty_file_raises_state_error(tmp_path, cut):
    # e.g. an SD card that lost its last writes; np.load raises EOFError / zipfile.BadZipFile here
    path = tmp_path / "state.npz"
    _state().save(path)
    data = path.read_bytes()
    path.write_bytes({"empty": b"", "half": data[:len(data) // 2], "tail": data[:-10]}[cut])
    with pytest.raises(StateError, match="unreadable"):
        DeviceState.load(path)


def _npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # np.savez pickles object arrays
    return buf.getvalue()


def _meta(**kw) -> np.ndarray:
    meta = {"last_uploaded_loss": None, "last_round": 1, "rounds_joined": 1, "uploads": 0, "bytes_up": 0,
            "bytes_down": 0, **kw}
    return np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)


@pytest.mark.parametrize("where", ["residual/w", "previous/w", "meta"])
def test_object_arrays_are_refused_and_never_unpickled(tmp_path, where):
    arrays = {"meta": _meta(), "residual/ok": np.zeros(2, np.float32)}
    arrays[where] = np.array([_Marker()], dtype=object)
    path = tmp_path / "state.npz"
    path.write_bytes(_npz(**arrays))
    with zipfile.ZipFile(path) as z:  # the file really holds a pickle
        assert any(b"unpickled" in z.read(n) for n in z.namelist())
    UNPICKLED.clear()
    with pytest.raises(StateError):
        DeviceState.load(path)
    assert UNPICKLED == []


@pytest.mark.parametrize("meta", [
    np.frombuffer(b"{not json", dtype=np.uint8),
    np.frombuffer(json.dumps({"unknown_field": 1}).encode(), dtype=np.uint8),
    np.frombuffer(json.dumps([1, 2]).encode(), dtype=np.uint8),
    None,  # no meta entry at all
])
def test_bad_metadata_raises_state_error(tmp_path, meta):
    arrays = {"residual/w": np.zeros(3, np.float32)}
    if meta is not None:
        arrays["meta"] = meta
    path = tmp_path / "state.npz"
    path.write_bytes(_npz(**arrays))
    with pytest.raises(StateError):
        DeviceState.load(path)


def test_fits_detects_shape_changes():
    state = _state()
    shapes = {"features.0.weight": (4, 1, 3, 3), "classifier.2.bias": (10,), "classifier.2.weight": (10, 64)}
    assert state.fits(shapes)
    assert DeviceState().fits(shapes)
    # re-pruned: fewer filters
    assert not state.fits({**shapes, "features.0.weight": (2, 1, 3, 3)})
    # a stored tensor no longer exists in the model
    assert not state.fits({k: v for k, v in shapes.items() if k != "classifier.2.bias"})
    # only `previous` disagrees
    only_prev = DeviceState(previous={"features.0.weight": np.zeros((3, 1, 3, 3), np.float32)})
    assert not only_prev.fits(shapes)


def test_reset_tensors_keeps_counters(tmp_path):
    state = _state()
    state.reset_tensors()
    assert state.residual == {} and state.previous == {}
    assert state.uploads == 9 and state.last_round == 17


def test_a_new_job_forgets_the_old_jobs_rounds_and_tensors_but_keeps_the_totals(tmp_path):
    state = DeviceState(residual={"w": np.ones(2, np.float32)}, previous={"w": np.zeros(2, np.float32)},
                        last_round=7, last_uploaded_loss=0.3, uploads=4, bytes_up=900, job="a")
    assert not state.start_job("a") and state.last_round == 7
    assert state.start_job("b")
    assert (state.job, state.last_round, state.last_uploaded_loss, state.residual, state.previous) == ("b", -1, None, {}, {})
    assert (state.uploads, state.bytes_up) == (4, 900)
    state.save(tmp_path / "s.npz")
    assert DeviceState.load(tmp_path / "s.npz").job == "b"
