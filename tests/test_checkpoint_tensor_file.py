"""The one-tensor-at-a-time safetensors writer: files safetensors reads back exactly, and a
device-homed export that is never copied whole."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from homestar.train.checkpoint.layout import describe
from homestar.train.checkpoint.tensor_file import LazyTensors, write_tensors
from runtime_helpers import Setup, attach_copy, batches, make_model, one_thread  # noqa: F401


def test_written_files_read_back_exactly(tmp_path):
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "w": torch.randn(7, 5, generator=gen),
        "strided": torch.randn(6, 4, generator=gen).t(),  # not contiguous
        "bf16": torch.randn(9, generator=gen).bfloat16(),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 3),
        "bytes": torch.arange(11, dtype=torch.uint8),
        "steps": torch.arange(4, dtype=torch.int64),
    }
    described = write_tensors(tmp_path / "t.safetensors", tensors)
    assert described == describe(tmp_path / "t.safetensors")  # hashed while written: no read-back needed
    back = load_file(tmp_path / "t.safetensors")
    assert set(back) == set(tensors)
    for name, tensor in tensors.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name
    with safe_open(tmp_path / "t.safetensors", framework="pt") as f:  # lazy reads of one key work too
        assert torch.equal(f.get_tensor("w"), tensors["w"])
    with pytest.raises(TypeError, match="complex"):
        write_tensors(tmp_path / "c.safetensors", {"c": torch.zeros(2, dtype=torch.complex64)})


def test_device_homed_chunks_are_exported_as_views_not_copies(monkeypatch):
    """The checkpoint export hands device-homed chunks over as views of device memory (the
    writer copies one tensor at a time); the plain state_dict still copies them to the host."""
    from homestar.runtime.placement import Placement

    setup = Setup()
    engine = attach_copy(make_model(setup), setup, budget_chunks=64, optimizer_placement="device")
    (idx, targets), = batches(1, 1)[0]
    engine.forward_backward(idx, targets, 1.0)
    engine.step(1e-3)
    copies = []
    real_read = Placement.read
    monkeypatch.setattr(Placement, "read", lambda self, chunk: copies.append(chunk.id) or real_read(self, chunk))
    streamed = engine.checkpoint_state()
    assert copies == []  # every chunk lives on the (simulated) device: nothing copied whole
    devices = {c.device.untyped_storage().data_ptr() for c in engine.placement.chunks if c.device is not None}
    assert all(t.untyped_storage().data_ptr() in devices for t in streamed["weights"].values())
    plain = engine.state_dict()
    assert copies  # the plain export copies
    for name, tensor in plain["weights"].items():
        assert torch.equal(tensor, streamed["weights"][name])
    engine.close()


def test_lazy_tensors_read_each_tensor_from_its_file_when_asked(tmp_path):
    a, b = torch.arange(6.0).reshape(2, 3), torch.ones(4, dtype=torch.bfloat16)
    write_tensors(tmp_path / "m.safetensors", {"exp_avg/a": a, "exp_avg/b": b, "exp_avg_sq/a": a * a})
    write_tensors(tmp_path / "w.safetensors", {"a": a})
    lazy = LazyTensors.of_files([(tmp_path / "m.safetensors", {"exp_avg/a", "exp_avg_sq/a"}),
                                 (tmp_path / "w.safetensors", None)])
    assert sorted(lazy) == ["a", "exp_avg/a", "exp_avg_sq/a"] and "exp_avg/b" not in lazy
    first = lazy.under("exp_avg")
    assert list(first) == ["a"] and first.shape_of("a") == (2, 3)
    assert torch.equal(first["a"], a) and torch.equal(lazy.under("exp_avg_sq")["a"], a * a)
    assert first["a"] is not first["a"]  # read afresh each time: nothing is kept
    (tmp_path / "w.safetensors").unlink()  # a file gone since its header was read
    with pytest.raises(OSError) as info:
        lazy["a"]
    assert info.value.filename.endswith("w.safetensors")


def test_a_resume_reads_each_tensor_of_the_checkpoint_once(tmp_path, monkeypatch):
    from collections import Counter

    from homestar.train.checkpoint import load_latest, save_checkpoint

    setup = Setup()
    engine = attach_copy(make_model(setup), setup)
    (idx, targets), = batches(1, 1)[0]
    engine.forward_backward(idx, targets, 1.0)
    engine.step(1e-3)
    save_checkpoint(tmp_path, 1, engine.checkpoint_state(), {"data": {}, "tokens": 0})
    reads = Counter()
    real = LazyTensors.__getitem__
    monkeypatch.setattr(LazyTensors, "__getitem__",
                        lambda self, name: reads.update([self._index[name]]) or real(self, name))
    state, _ = load_latest(tmp_path)
    fresh = attach_copy(make_model(setup, seed=1), setup)
    fresh.load_state_dict(state)
    moments = len(state["optimizer"]["exp_avg"]) + len(state["optimizer"]["exp_avg_sq"])
    assert len(reads) == len(state["weights"]) + moments > 0 and set(reads.values()) == {1}
    for name, tensor in engine.state_dict()["weights"].items():
        assert torch.equal(fresh.state_dict()["weights"][name], tensor)
    engine.close()
    fresh.close()
