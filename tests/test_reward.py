"""The reward model with the MPS interface: the shapes-world reward stage, and real-MPS loading/conversion."""
import json
import math
import sys
import types
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from models.clip_image import clip_preprocess
from models.reward import (CONDITIONS, DEGRADATIONS, MPSNet, RewardScorer, ShapesReward, bradley_terry_loss,
                           condition_mask, degrade, listwise_loss, pairwise_accuracy)
from tasks import reward as R
from tlcm.shapes import render as RD
from tlcm.shapes import world as W
from tlcm.core.params import Source, load_params
from tlcm.core.paths import Paths
from tlcm.loaders.reward_io import UnsafePickleWarning, convert_mps, load_mps, load_reward, load_tokenizer
from tlcm.core.storage import ArtifactError
from tlcm.shapes.tokenizer import write_tokenizer

SMOKE_REWARD = {"width": 8, "steps": 4, "batch_size": 8, "n_val_pairs": 32, "checkpoint_every": 2}


def with_reward(params, **update):
    return params.model_copy(update={"reward": params.reward.model_copy(update=update)})


@pytest.fixture(scope="module")
def params():
    return with_reward(load_params(preset="smoke"), **SMOKE_REWARD)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, params):
    """world + reward on the smoke config, once for this module."""
    from tasks import world

    paths = Paths(tmp_path_factory.mktemp("artifacts"))
    world.run(params, paths)
    return paths, R.run(params, paths)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok") / "tokenizer"
    write_tokenizer(W.words(), folder, 24)
    return folder


# ---- the shapes-world reward stage ---------------------------------------------------------

def test_stage_saves_model_config_metrics_and_loads_frozen(trained, params):
    paths, metrics = trained
    assert {f.name for f in paths.reward.iterdir()} == {"model.safetensors", "config.json", "tokenizer"}
    config = json.loads((paths.reward / "config.json").read_text())
    assert config["kind"] == "shapes" and config["width"] == 8 and config["conditions"] == list(CONDITIONS)
    assert set(metrics["accuracy"]) == {*CONDITIONS, "all"}
    assert all(0.0 <= a <= 1.0 for a in metrics["accuracy"].values())
    assert metrics["n_val_pairs"] == 32 and metrics["steps"] == 4
    assert set(config["margin_auto"]) == set(CONDITIONS) and config["margin_auto"] == metrics["margin_auto"]
    assert json.loads((paths.metrics / "reward.json").read_text())["margin_auto"] == metrics["margin_auto"]

    net = load_reward(params, paths)
    assert isinstance(net, ShapesReward) and isinstance(net, RewardScorer)
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    specs = W.sample_specs(3, 4, "eval")
    images = RD.to_unit_tensor(RD.render_batch(specs, 3))
    s = net.score(images, [sp.caption() for sp in specs], "overall")
    assert s.shape == (4,) and torch.isfinite(s).all()
    # margin_auto is the mean score of clean aligned held-out renders: recomputed from the saved model
    val = R.validation_pairs(params)
    again = net.score(val.preferred, val.prompts_w, "detail").mean().item()
    assert again == pytest.approx(metrics["margin_auto"]["detail"], rel=1e-5, abs=1e-6)


def test_resumed_stage_ends_with_the_same_weights(trained, params, tmp_path):
    """Kill after step 2 (the final checkpoint never written), run again: the result is the
    uninterrupted run's, because the pairs are a pure function of (seed, step)."""
    import shutil

    paths, metrics = trained
    copy = Paths(tmp_path / "artifacts")
    shutil.copytree(paths.world, copy.world)
    shutil.copytree(paths.checkpoints("reward"), copy.checkpoints("reward"))
    (final,) = copy.checkpoints("reward").glob("*/step-00000004.safetensors")
    final.unlink()
    assert any(copy.checkpoints("reward").glob("*/step-00000002.safetensors"))
    resumed = R.run(params, copy)
    assert resumed["accuracy"] == metrics["accuracy"] and resumed["margin_auto"] == metrics["margin_auto"]
    from tlcm.core.storage import load_tensors

    a, b = (load_tensors(p.reward / "model.safetensors") for p in (paths, copy))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_shapes_score_is_differentiable_in_the_images(trained, params):
    net = load_reward(params, trained[0])
    specs = W.sample_specs(5, 3, "train")
    images = RD.to_unit_tensor(RD.render_batch(specs, 5)).requires_grad_(True)
    net.score(images, [s.caption() for s in specs], "alignment").sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert all(p.grad is None for p in net.parameters())
    with pytest.raises(ValueError, match="unknown reward condition 'aesthetics'"):
        net.score(images, [s.caption() for s in specs], "aesthetics")


def test_missing_or_corrupt_reward_says_what_to_run(params, tmp_path, trained):
    with pytest.raises(ArtifactError, match="tlcm stage reward"):
        load_reward(params, Paths(tmp_path / "nothing"))
    import shutil

    broken = Paths(tmp_path / "broken")
    shutil.copytree(trained[0].reward, broken.reward)
    (broken.reward / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ArtifactError, match="corrupt"):
        load_reward(params, broken)


# ---- preference pairs and losses --------------------------------------------------------------

@pytest.mark.math
def test_alternatives_change_exactly_one_attribute():
    one = W.Spec((W.Obj("red", "circle", "small"),), "gray", position="left")
    counts = {k: len(R.alternatives(one, k)) for k in R.ALIGNMENT_KINDS}
    assert counts == {"colour": 5, "shape": 3, "size": 1, "position": 4, "background": 2}
    assert R.alternatives(one, "size")[0].objects[0].size == "large"
    two = W.Spec((W.Obj("red", "circle", "medium"), W.Obj("blue", "square", "medium")), "white", relation="left of")
    assert R.alternatives(two, "size") == []
    assert {s.relation for s in R.alternatives(two, "position")} == {"right of", "above", "below"}
    # the first object may not become a blue square (the grammar never draws two identical objects)
    assert W.Obj("blue", "square", "medium") not in {s.objects[0] for s in R.alternatives(two, "shape")}

    def fields(s: W.Spec) -> list:
        return [v for o in s.objects for v in (o.colour, o.shape, o.size)] + [s.bg, s.position, s.relation]

    for kind in R.ALIGNMENT_KINDS:
        for alt in R.alternatives(two, kind) + R.alternatives(one, kind):
            base = one if len(alt.objects) == 1 else two
            assert alt.caption() != base.caption()
            assert sum(a != b for a, b in zip(fields(alt), fields(base))) == 1


def test_training_pairs_are_pure_and_never_show_heldout_specs():
    a, b = (R.make_pairs(123, 24, "train", 0.5, 32) for _ in range(2))
    assert torch.equal(a.preferred, b.preferred) and torch.equal(a.rejected, b.rejected)
    assert a.prompts_l == b.prompts_l and a.kinds == b.kinds
    assert all(s.split() == "train" for s in a.specs)
    rng = np.random.default_rng(0)
    for s in a.specs:
        assert R.misalign(s, rng, train_only=True)[1].split() == "train"
    text_side = [i for i, k in enumerate(a.kinds) if k.endswith("/text")]
    image_side = [i for i, k in enumerate(a.kinds) if k.endswith("/image")]
    degraded = [i for i, k in enumerate(a.kinds) if k in DEGRADATIONS]
    assert all(a.prompts_l[i] != a.prompts_w[i] and torch.equal(a.rejected[i], a.preferred[i]) for i in text_side)
    assert all(a.prompts_l[i] == a.prompts_w[i] and not torch.equal(a.rejected[i], a.preferred[i])
               for i in image_side + degraded)
    assert {CONDITIONS[int(a.conditions[i])] for i in degraded} <= {"detail", "overall"}


@pytest.mark.math
@pytest.mark.parametrize("kind", DEGRADATIONS)
def test_degradations_stay_images_and_change_them(kind):
    x = RD.to_unit_tensor(RD.render_batch(W.sample_specs(1, 4, "train"), 1))
    y = degrade(x, kind, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
    assert (y - x).abs().mean() > 0.005


@pytest.mark.math
def test_losses_golden():
    zero = torch.zeros(3)
    assert bradley_terry_loss(zero, zero).item() == pytest.approx(math.log(2))
    sw, sl = torch.tensor([2.0, -1.0]), torch.tensor([1.0, 0.5])
    assert bradley_terry_loss(sw, sl).item() == pytest.approx(
        (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(1.5))) / 2)
    assert listwise_loss(torch.stack([sw, sl], 1)).item() == pytest.approx(bradley_terry_loss(sw, sl).item())
    assert listwise_loss(torch.tensor([[1.0, 0.0, float("-inf")]])).item() == pytest.approx(math.log1p(math.exp(-1)))
    assert pairwise_accuracy(torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, 0.0, 3.0])) == pytest.approx(0.5)


# ---- MPS --------------------------------------------------------------------------------------

def tiny_mps(tok) -> MPSNet:
    from transformers import CLIPConfig

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={"vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "max_position_embeddings": 24, "bos_token_id": tok.bos_token_id,
                     "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 16, "patch_size": 8},
        projection_dim=16)
    net = MPSNet(config, {"dim": 16, "layer_num": 2, "dim_head": 8, "heads": 2, "ff_mult": 2}, tokenizer=tok)
    with torch.no_grad():  # random, not all-zero, LayerNorm gains: every weight matters for the score
        for name, p in net.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return net.eval()


@pytest.fixture
def released(tmp_path, tokenizer_dir, monkeypatch):
    """A tiny MPS saved like the release: a whole pickled ``trainer.models.clip_model.CLIPModel``
    (the ``trainer`` package is importable only while saving)."""
    tok = load_tokenizer(tokenizer_dir, "test", "")
    ref = tiny_mps(tok)
    mod = types.ModuleType("trainer.models.clip_model")

    class CLIPModel(nn.Module):
        def __init__(self, model, cross_model):
            super().__init__()
            self.model, self.cross_model = model, cross_model

    CLIPModel.__module__, CLIPModel.__qualname__ = mod.__name__, "CLIPModel"
    mod.CLIPModel = CLIPModel
    with monkeypatch.context() as m:
        for name in ("trainer", "trainer.models", "trainer.models.clip_model"):
            m.setitem(sys.modules, name, mod if name.endswith("clip_model") else types.ModuleType(name))
        torch.save(CLIPModel(ref.model, ref.cross_model), tmp_path / "MPS_overall_checkpoint.pth")
    assert "trainer" not in sys.modules
    return tmp_path / "MPS_overall_checkpoint.pth", ref, tok


def images_and_prompts(n: int = 3, size: int = 20):
    specs = W.sample_specs(9, n, "eval")
    return RD.to_unit_tensor(RD.render_batch(specs, 9, size)), [s.caption() for s in specs]


@pytest.mark.math
def test_pickled_mps_is_refused_without_trust(released, tmp_path, params):
    pth, _, _ = released
    with pytest.raises(ArtifactError, match="trust_pickled.*convert-mps|convert-mps.*trust_pickled"):
        load_mps(pth)
    with pytest.raises(ArtifactError, match="refusing to unpickle"):
        load_reward(with_reward(params, source=Source(location=str(pth))), Paths(tmp_path))
    with pytest.raises(ArtifactError, match="refusing to unpickle"):
        convert_mps(pth, tmp_path / "converted", trust_pickled=False)
    assert not (tmp_path / "converted").exists()
    with pytest.raises(ArtifactError, match="refusing to unpickle"):  # the stage checks the same way
        R.run(with_reward(params, source=Source(location=str(pth))), Paths(tmp_path))


@pytest.mark.math
def test_pickled_mps_loads_with_trust_and_a_warning_and_scores_like_the_original(released, tokenizer_dir):
    pth, ref, tok = released
    with pytest.warns(UnsafePickleWarning, match="trust_pickled"):
        net = load_mps(pth, trust_pickled=True, tokenizer=tokenizer_dir)
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    images, prompts = images_and_prompts()
    with torch.no_grad():
        torch.testing.assert_close(net.score(images, prompts, "overall"), ref.score(images, prompts, "overall"))


def test_converted_mps_loads_without_unpickling_and_gives_identical_scores(released, tmp_path, tokenizer_dir, params):
    pth, _, _ = released
    with pytest.warns(UnsafePickleWarning):
        pickled = load_mps(pth, trust_pickled=True, tokenizer=tokenizer_dir)
        out = convert_mps(pth, tmp_path / "mps", trust_pickled=True, tokenizer=tokenizer_dir)
    assert {f.name for f in out.iterdir()} == {"model.safetensors", "config.json", "tokenizer"}
    config = json.loads((out / "config.json").read_text())
    assert config["cross"] == {"dim": 16, "layer_num": 2, "dim_head": 8, "heads": 2, "ff_mult": 2}
    assert config["clip"]["vision_config"]["image_size"] == 16 and config["mask_threshold"] == 0.3
    pth.unlink()  # the converted folder stands alone
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnsafePickleWarning)
        converted = load_reward(with_reward(params, source=Source(location=str(out))), Paths(tmp_path))
        also = load_mps(out / "model.safetensors")
    assert isinstance(converted, MPSNet) and isinstance(converted, RewardScorer)
    stage = R.run(with_reward(params, source=Source(location=str(out))), Paths(tmp_path / "artifacts"))  # checks, trains nothing
    assert stage["margin_auto"] is None and stage["found"].startswith("converted MPS")
    images, prompts = images_and_prompts()
    with torch.no_grad():
        a, b, c = (m.score(images, prompts, "overall") for m in (pickled, converted, also))
    assert torch.equal(a, b) and torch.equal(b, c)


@pytest.mark.math
def test_mps_score_is_differentiable_in_the_images(released, tokenizer_dir):
    _, ref, _ = released
    net = ref.requires_grad_(False)
    images, prompts = images_and_prompts()
    images.requires_grad_(True)
    net.score(images, prompts, "overall").sum().backward()
    assert images.grad.abs().sum() > 0


@pytest.mark.math
def test_missing_mps_checkpoint_is_a_clear_error(tmp_path, params):
    with pytest.raises(ArtifactError, match="MPS checkpoint not found.*convert-mps"):
        load_reward(with_reward(params, source=Source(location=str(tmp_path / "no_such_folder"))), Paths(tmp_path))
    with pytest.raises(ArtifactError, match="MPS checkpoint not found"):
        load_mps(tmp_path / "missing.pth", trust_pickled=True)


@pytest.mark.math
def test_condition_mask_keeps_prompt_tokens_similar_to_the_condition():
    text = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [-1.0, 0.0]]])  # four prompt tokens
    cond = torch.tensor([[[1.0, 0.0], [0.9, 0.1]]])  # two condition tokens
    # best similarity per prompt token: 1.0, 0.1, 0.5, -0.9 -> / 1.0 -> kept where > 0.3
    mask = condition_mask(text, cond, 0.3)
    assert mask.shape == (1, 1, 4)
    assert mask[0, 0].tolist() == [0.0, float("-inf"), 0.0, float("-inf")]


@pytest.mark.math
def test_clip_preprocess_resizes_crops_and_normalises():
    x = torch.full((2, 3, 20, 30), 0.5)
    y = clip_preprocess(x, 16)
    assert y.shape == (2, 3, 16, 16)
    expected = (0.5 - torch.tensor([0.48145466, 0.4578275, 0.40821073])) / torch.tensor(
        [0.26862954, 0.26130258, 0.27577711])
    torch.testing.assert_close(y[0, :, 8, 8], expected)
    ramp = torch.linspace(0, 1, 30).expand(1, 3, 20, 30)
    centre = clip_preprocess(ramp, 20, mean=(0, 0, 0), std=(1, 1, 1))
    assert centre.shape == (1, 3, 20, 20)
    torch.testing.assert_close(centre[0, 0, 0, 10], ramp[0, 0, 0, 15], atol=0.03, rtol=0)  # centre crop
