"""Latent LPIPS (TLCM §4.3): the network, the 2AFC score, the BAPPS reader/writer and the two stages."""
import json
import os

import numpy as np
import pytest
import torch
from torch import nn

from models.latent_lpips import LatentLPIPS, NetLinLayer, RankingHead, ranking_loss, two_afc_score
from tlcm.loaders import bapps_io as B
from tlcm.shapes import synthetic_bapps as S
from tlcm.core.params import BappsParams, LatentLpipsParams, WorldParams
from tlcm.core.paths import Paths
from tlcm.core.storage import ArtifactError


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return LatentLPIPS(in_channels=4, width_divisor=8)


@pytest.mark.math
def test_vgg16_shape_on_latents(net):
    convs = [m for m in net.net.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 13 and convs[0].in_channels == 4
    assert [c.out_channels for c in convs] == [8, 8, 16, 16, 32, 32, 32, 64, 64, 64, 64, 64, 64]
    assert sum(isinstance(m, nn.MaxPool2d) for m in net.net.modules()) == 1  # VGG-16's 4 pools minus the first 3
    taps = net.net(torch.randn(2, 4, 16, 16))
    assert [tuple(t.shape[1:]) for t in taps] == [(8, 16, 16), (16, 16, 16), (32, 16, 16), (64, 16, 16), (64, 8, 8)]
    assert [lin.weight.shape[1] for lin in net.lins] == [8, 16, 32, 64, 64]


def test_distance_is_zero_nonnegative_symmetric(net):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(3, 4, 16, 16, generator=g), torch.randn(3, 4, 16, 16, generator=g)
    with torch.no_grad():
        assert torch.equal(net(x, x), torch.zeros(3))
        dxy, dyx = net(x, y), net(y, x)
        close = net(x, x + 0.01 * y)
    assert dxy.shape == (3,) and (dxy > 0).all()
    torch.testing.assert_close(dxy, dyx)
    assert (close < dxy).all()
    d0, d1 = net.triplet_distances(x, y, x)
    torch.testing.assert_close(d0, dxy)
    assert torch.equal(d1, torch.zeros(3))


def test_linear_weights_stay_nonnegative_after_optimiser_step():
    torch.manual_seed(0)
    m = LatentLPIPS(4, 16)
    x, y = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    before = [lin.raw.detach().clone() for lin in m.lins]
    opt = torch.optim.SGD(m.lins.parameters(), lr=1e4)  # a huge step that would drive plain weights negative
    m(x, y).mean().backward()
    opt.step()
    assert all(not torch.equal(b, lin.raw) for b, lin in zip(before, m.lins))
    assert all((lin.raw < 0).any() for lin in m.lins)  # the raw parameters did go negative ...
    assert all((lin.weight >= 0).all() for lin in m.lins)  # ... the 1x1 weights did not
    with torch.no_grad():
        assert (m(x, y) >= 0).all()
    assert isinstance(m.lins[0], NetLinLayer)


@pytest.mark.math
def test_two_afc_score_golden():
    s = two_afc_score([1.0, 2.0, 1.0, 0.5], [2.0, 1.0, 1.0, 0.1], [0.2, 0.7, 0.4, 1.0])
    torch.testing.assert_close(s, torch.tensor([0.8, 0.7, 0.5, 1.0], dtype=torch.float64))
    assert float(s.mean()) == pytest.approx(0.75)
    assert float(two_afc_score([0.0], [1.0], [1.0])[0]) == 0.0  # calls p0 closer, everyone preferred p1


def test_gradients_flow_into_input_through_frozen_net():
    torch.manual_seed(0)
    m = LatentLPIPS(4, 8).eval().requires_grad_(False)
    for shape in ((2, 4, 16, 16), (2, 4, 5, 7), (1, 4, 4, 4)):
        x = torch.randn(shape, requires_grad=True)
        target = torch.randn(shape)
        d = m(x, target)
        assert d.shape == (shape[0],)
        d.sum().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in m.parameters())
    x = torch.zeros(1, 4, 8, 8, requires_grad=True)  # all-zero features: the normalisation must stay finite
    m(x, torch.zeros(1, 4, 8, 8)).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_ranking_head_learns_the_preference():
    torch.manual_seed(0)
    head = RankingHead()
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    d0, d1 = torch.rand(256), torch.rand(256)
    judge = (d1 < d0).float()  # judges prefer the closer one
    first = ranking_loss(head, d0, d1, judge).item()
    for _ in range(200):
        opt.zero_grad()
        loss = ranking_loss(head, d0, d1, judge)
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first
    assert ((torch.sigmoid(head(d0, d1)) > 0.5).float() == judge).float().mean() > 0.95


@pytest.mark.math
def test_ssim_matches_reference():
    from torchmetrics.functional.image import structural_similarity_index_measure as tm_ssim

    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 32, 32, generator=g)
    y = (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    torch.testing.assert_close(S.ssim(x, x), torch.ones(4))
    torch.testing.assert_close(S.ssim(x, y), tm_ssim(x, y, data_range=1.0, reduction="none"), atol=0.01, rtol=0)


def test_synthetic_bapps_has_real_layout_and_reads_back(tmp_path):
    bp, wp = BappsParams(n_train=6, n_val=4, judges=5), WorldParams()
    root = tmp_path / "bapps"
    summary = S.write_synthetic(root, bp, wp)
    assert summary["train"]["triplets"] == 6
    for split, n in (("train", 6), ("val", 4)):
        base = root / "2afc" / split / S.SYNTHETIC_SET
        for part in ("ref", "p0", "p1"):
            assert sorted(p.name for p in (base / part).iterdir()) == [f"{i:06d}.png" for i in range(n)]
        judge = np.load(base / "judge" / "000000.npy")
        assert judge.shape == (1,) and 0.0 <= judge[0] <= 1.0
    assert B.summarize(root) == {"train": {"shapes": 6}, "val": {"shapes": 4}}
    t = B.load_2afc(root, "train")
    assert t.ref.shape == t.p0.shape == t.p1.shape == (6, 32, 32, 3) and t.ref.dtype == np.uint8
    assert t.judge.shape == (6,) and ((t.judge >= 0) & (t.judge <= 1)).all()
    np.testing.assert_allclose(t.judge * 5, np.round(t.judge * 5), atol=1e-5)  # vote fractions of 5 judges
    assert (t.p0 != t.ref).any() and (t.p1 != t.p0).any()
    again = S.synthetic_triplets(bp, wp, "train", 6)  # deterministic in the seed; PNG is lossless
    assert np.array_equal(again.ref, t.ref) and np.array_equal(again.p1, t.p1) and np.array_equal(again.judge, t.judge)
    assert not np.array_equal(S.synthetic_triplets(bp, wp, "val", 6).ref, t.ref)


@pytest.mark.math
def test_missing_bapps_gives_clear_error(tmp_path):
    missing = tmp_path / "no-bapps-here"
    with pytest.raises(ArtifactError, match="no-bapps-here") as e:
        B.load_2afc(missing, "train")
    assert "PerceptualSimilarity" in str(e.value) and "download_dataset.sh" in str(e.value)
    (tmp_path / "partial" / "2afc" / "train" / "cnn" / "ref").mkdir(parents=True)
    with pytest.raises(ArtifactError, match=r"cnn.p0"):
        B.summarize(tmp_path / "partial", ("train",))
    (tmp_path / "no-val" / "2afc" / "train").mkdir(parents=True)
    with pytest.raises(ArtifactError, match=r"no-val.2afc.val"):
        B.summarize(tmp_path / "no-val", ("val",))


@pytest.mark.math
def test_real_bapps_source_is_checked(tmp_path, smoke_params):
    from tasks import bapps as stage

    params = smoke_params.model_copy(update={"bapps": BappsParams(source=str(tmp_path / "BAPPS"))})
    with pytest.raises(ArtifactError, match="BAPPS"):
        stage.run(params, Paths(tmp_path / "art"))


def test_stages_end_to_end(tmp_path, smoke_artifacts, smoke_params):
    from tasks import bapps as bapps_stage
    from tasks import latent_lpips as stage

    paths = Paths(tmp_path / "art")
    paths.root.mkdir()
    os.symlink(smoke_artifacts.autoencoder, paths.autoencoder)
    params = smoke_params.model_copy(update={
        "bapps": BappsParams(n_train=64, n_val=32),
        "latent_lpips": LatentLpipsParams(width_divisor=16, steps=20, batch_size=16, checkpoint_every=10),
    })
    with pytest.raises(ArtifactError, match="latent_lpips"):
        stage.load_latent_lpips(params, paths)

    m = bapps_stage.run(params, paths)
    assert (m["n_train"], m["n_val"]) == (64, 32)
    assert json.loads((paths.metrics / "bapps.json").read_text())["n_val"] == 32

    m = stage.run(params, paths)
    agree = m["val_2afc"]
    assert set(agree) == {"latent_lpips", "latent_mse", "pixel_oracle_ssim"}
    assert all(0.0 <= v <= 1.0 for v in agree.values())
    assert agree["pixel_oracle_ssim"] > 0.6  # the oracle made the judgements (up to label noise)
    assert m["steps"] == 20 and m["val_triplets"] == 32 and m["latent_shape"] == [4, 16, 16]
    for f in (paths.metrics / "latent_lpips.json", paths.root / "latent_lpips" / "metrics.json"):
        assert json.loads(f.read_text())["val_2afc"] == agree

    net = stage.load_latent_lpips(params, paths)
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    assert net.config() == {"in_channels": 4, "width_divisor": 16}
    z = torch.randn(2, 4, 16, 16, requires_grad=True)
    d = net(z, torch.randn(2, 4, 16, 16))
    d.sum().backward()
    assert d.shape == (2,) and (d >= 0).all() and z.grad.abs().sum() > 0

    (paths.root / "latent_lpips" / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ArtifactError, match="model.safetensors"):
        stage.load_latent_lpips(params, paths)
