import json

import pytest
import torch

from tlcm.core.checkpoints import Checkpointer
from tlcm.core.storage import ArtifactError, atomic_dir, load_tensors, save_tensors
from tlcm.core.training import NonFiniteLoss, ensure_finite, run_loop

pytestmark = pytest.mark.math


def test_atomic_dir_keeps_old_content_on_failure(tmp_path):
    target = tmp_path / "out"
    with atomic_dir(target) as d:
        (d / "a.txt").write_text("good")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as d:
            (d / "a.txt").write_text("half")
            raise RuntimeError("killed")
    assert (target / "a.txt").read_text() == "good"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary left behind


def test_corrupt_weights_name_the_file(tmp_path):
    f = tmp_path / "w.safetensors"
    save_tensors(f, {"x": torch.ones(3)})
    f.write_bytes(f.read_bytes()[:20])
    with pytest.raises(ArtifactError, match=str(f)):
        load_tensors(f)
    with pytest.raises(ArtifactError, match="not found"):
        load_tensors(tmp_path / "missing.safetensors")


def _toy(seed=0):
    torch.manual_seed(seed)
    net = torch.nn.Linear(3, 1)
    return net, torch.optim.AdamW(net.parameters(), lr=0.1)


def _step_fn(net, opt, nan_at=None):
    def fn(step):
        g = torch.Generator().manual_seed(step)
        x = torch.randn(8, 3, generator=g)
        loss = (net(x) - x.sum(1, keepdim=True)).pow(2).mean()
        if step == nan_at:
            loss = loss * float("nan")
        terms = {"loss": loss}
        ensure_finite(terms, "toy", step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return {"loss": loss.item()}
    return fn


def test_resume_matches_uninterrupted_run(tmp_path):
    net, opt = _toy()
    run_loop("toy", 6, _step_fn(net, opt), {"net": net, "opt": opt}, Checkpointer(tmp_path / "a", "fp"), 3,
             show_progress=False)
    net2, opt2 = _toy()
    ck = Checkpointer(tmp_path / "b", "fp")
    run_loop("toy", 3, _step_fn(net2, opt2), {"net": net2, "opt": opt2}, ck, 3, show_progress=False)
    net3, opt3 = _toy(seed=99)  # a fresh process: different init, must be overwritten by the checkpoint
    res = run_loop("toy", 6, _step_fn(net3, opt3), {"net": net3, "opt": opt3}, ck, 3, show_progress=False)
    assert res.resumed_from == 3
    assert torch.equal(net.weight, net3.weight) and torch.equal(net.bias, net3.bias)


def test_nan_stops_and_keeps_last_good_checkpoint(tmp_path):
    net, opt = _toy()
    ck = Checkpointer(tmp_path / "c", "fp")
    with pytest.raises(NonFiniteLoss, match="last good checkpoint"):
        run_loop("toy", 10, _step_fn(net, opt, nan_at=5), {"net": net, "opt": opt}, ck, 2, show_progress=False)
    step, state = ck.load_latest()
    assert step == 4
    assert all(torch.isfinite(v).all() for v in state["net"].values())
    assert json.loads((tmp_path / "c" / "fp" / "latest.json").read_text())["step"] == 4


def test_checkpoint_for_other_params_is_not_resumed(tmp_path):
    net, opt = _toy()
    Checkpointer(tmp_path, "old").save(3, {"net": net.state_dict()})
    assert Checkpointer(tmp_path, "new").load_latest() is None
