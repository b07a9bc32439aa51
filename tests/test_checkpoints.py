"""Checkpoints a user can trust (issue "Truthful reruns", item 2): retention never removes the
checkpoint just written or another identity's, ``latest.json`` always names a file that exists,
a truncated or bit-flipped checkpoint is named and the run falls back to the previous good one
(or starts fresh, saying so), and a checkpoint of other inputs is never resumed but kept until
the new run has published."""
import json
import logging

import pytest
import torch

from tlcm.core.checkpoints import Checkpointer, prune_after_success
from tlcm.core.training import run_loop

pytestmark = pytest.mark.math


def _state(value: float) -> dict:
    return {"net": {"w": torch.full((4, 4), value), "b": torch.full((4,), value)}, "count": 1}


def _pointers_name_existing_files(folder) -> list:
    pointers = list(folder.rglob("latest.json"))
    for p in pointers:
        assert (p.parent / json.loads(p.read_text())["file"]).is_file(), f"{p} names a missing file"
    return pointers


def _step_file(folder, step: int):
    (f,) = folder.rglob(f"step-{step:08d}.safetensors")
    return f


def test_retention_keeps_the_new_run_and_the_earlier_runs_checkpoint(tmp_path):
    """A longer run (steps 2, 4, 6) then a run with other params: its step-2 checkpoint survives,
    latest.json names it, and the earlier complete checkpoint still loads for its own params."""
    earlier = Checkpointer(tmp_path, "params-a")
    for step in (2, 4, 6):
        earlier.save(step, _state(step))
    new = Checkpointer(tmp_path, "params-b")
    written = new.save(2, _state(-1.0))
    assert written.is_file()
    assert _pointers_name_existing_files(tmp_path)
    step, state = new.load_latest()
    assert step == 2 and torch.equal(state["net"]["w"], torch.full((4, 4), -1.0))
    step, state = Checkpointer(tmp_path, "params-a").load_latest()
    assert step == 6 and torch.equal(state["net"]["w"], torch.full((4, 4), 6.0))


def test_retention_keeps_the_newest_of_one_identity(tmp_path):
    ck = Checkpointer(tmp_path, "fp", keep=2)
    for step in (1, 2, 3, 4):
        ck.save(step, _state(step))
    assert sorted(f.name for f in tmp_path.rglob("step-*.safetensors")) == ["step-00000003.safetensors",
                                                                            "step-00000004.safetensors"]


def test_truncated_latest_falls_back_to_the_previous_good_checkpoint(tmp_path, caplog):
    ck = Checkpointer(tmp_path, "fp")
    ck.save(2, _state(2.0))
    ck.save(4, _state(4.0))
    bad = _step_file(tmp_path, 4)
    bad.write_bytes(bad.read_bytes()[:100])
    with caplog.at_level(logging.INFO, logger="tlcm"):
        step, state = Checkpointer(tmp_path, "fp").load_latest()
    assert step == 2 and torch.equal(state["net"]["b"], torch.full((4,), 2.0))
    assert str(bad) in caplog.text and "falling back" in caplog.text
    assert _pointers_name_existing_files(tmp_path)
    assert bad.with_name(bad.name + ".corrupt").is_file()  # kept for inspection, never resumed


def test_overwritten_tensor_bytes_are_detected(tmp_path, caplog):
    """Same size, tensor bytes replaced by 0xFF (3.4e38-like garbage): not loaded silently."""
    ck = Checkpointer(tmp_path, "fp")
    ck.save(2, _state(2.0))
    ck.save(4, _state(4.0))
    f = _step_file(tmp_path, 4)
    data = bytearray(f.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    data[header:] = b"\xff" * (len(data) - header)
    f.write_bytes(bytes(data))
    with caplog.at_level(logging.INFO, logger="tlcm"):
        step, state = Checkpointer(tmp_path, "fp").load_latest()
    assert step == 2 and torch.isfinite(state["net"]["w"]).all()
    assert str(f) in caplog.text and "checksum" in caplog.text


def test_only_checkpoint_corrupt_starts_fresh_saying_so(tmp_path, caplog):
    ck = Checkpointer(tmp_path, "fp")
    ck.save(3, _state(3.0))
    f = _step_file(tmp_path, 3)
    f.write_bytes(f.read_bytes()[:50])
    with caplog.at_level(logging.INFO, logger="tlcm"):
        assert Checkpointer(tmp_path, "fp").load_latest() is None
    assert "starting fresh" in caplog.text and str(f) in caplog.text
    assert _pointers_name_existing_files(tmp_path) == []  # no pointer left at the bad file


def _toy_loop(tmp_path, fp, total, caplog=None):
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)

    def step_fn(step):
        x = torch.randn(4, 3, generator=torch.Generator().manual_seed(step))
        loss = net(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        return {"loss": loss.item()}

    res = run_loop("toy", total, step_fn, {"net": net, "opt": opt}, Checkpointer(tmp_path, fp), 2, show_progress=False)
    return res, net


def test_run_after_a_corrupt_checkpoint_resumes_from_the_previous_good_one(tmp_path):
    """What the old message ('delete it and re-run') led to: 'checkpoint not found'. Now the
    re-run itself falls back and ends with the uninterrupted run's weights."""
    _, straight = _toy_loop(tmp_path / "a", "fp", 6)
    _toy_loop(tmp_path / "b", "fp", 4)  # checkpoints at 2 and 4
    f = _step_file(tmp_path / "b", 4)
    f.write_bytes(f.read_bytes()[:64])
    res, resumed = _toy_loop(tmp_path / "b", "fp", 6)
    assert res.resumed_from == 2
    assert torch.equal(straight.weight, resumed.weight)


def test_other_identity_is_not_resumed_and_kept_until_the_new_run_publishes(tmp_path, caplog):
    old = Checkpointer(tmp_path, "old-inputs")
    old.save(3, _state(3.0))
    with caplog.at_level(logging.INFO, logger="tlcm"):
        with prune_after_success():
            new = Checkpointer(tmp_path, "new-inputs")
            assert new.load_latest() is None
            assert "not resumed, starting fresh" in caplog.text and "old-inputs" in caplog.text
            new.save(1, _state(1.0))
            assert (tmp_path / "old-inputs" / "step-00000003.safetensors").is_file()  # kept while the run works
    assert not (tmp_path / "old-inputs").exists()  # published: the old identity's checkpoints are removed
    assert Checkpointer(tmp_path, "new-inputs").load_latest()[0] == 1


def test_a_failed_run_keeps_the_other_identitys_checkpoints(tmp_path):
    Checkpointer(tmp_path, "old-inputs").save(3, _state(3.0))
    try:
        with prune_after_success():
            Checkpointer(tmp_path, "new-inputs").save(1, _state(1.0))
            raise RuntimeError("killed")
    except RuntimeError:
        pass
    assert Checkpointer(tmp_path, "old-inputs").load_latest()[0] == 3


def test_lower_steps_resume_from_the_newest_checkpoint_not_past_them(tmp_path):
    ck = Checkpointer(tmp_path, "fp", keep=3)
    for step in (2, 4, 6):
        ck.save(step, _state(step))
    step, _ = ck.load(max_step=5)
    assert step == 4
    assert ck.load(max_step=1) is None
