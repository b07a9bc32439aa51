"""Prompt sources, the Table 1 scorers and loaders, the suite and the preflight, on small random instances.

Every network here has the real architecture at a tiny size (random weights, built from a
config and saved the way the released assets are), so the loaders, key mappings and score
formulas run end to end without any download.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from conftest import REPO, run_cli
from models.clip_image import ImageTransform
from models.scorers import (IMAGEREWARD_MEAN, IMAGEREWARD_STD, AestheticMLP, clip_score, imagereward_state_dicts,
                            uint8_to_unit)
from tlcm.core.params import Source, load_params
from tlcm.core.paths import Paths
from tlcm.core.storage import ArtifactError

WORDS = ["a", "red", "blue", "cat", "dog", "on", "the", "mat", "photo", "of", "green", "tree"]
PROMPTS = ["a photo of a red cat", "a blue dog on the mat", "a green tree", "the cat on a mat"]


@pytest.fixture(scope="module")
def params():
    return load_params(REPO / "params.yaml", "smoke")


def with_suite(params, **kw):
    """``params`` with ``suite`` fields replaced (``fid_inception`` too, read with getattr by the suite)."""
    return params.model_copy(update={"suite": params.suite.model_copy(update=kw)})


def affine_of(head: AestheticMLP) -> tuple[torch.Tensor, torch.Tensor]:
    """The MLP has no activations: its exact affine map (W, b), multiplied out by hand."""
    lins = [m for m in head.layers if isinstance(m, nn.Linear)]
    w, b = lins[0].weight.double(), lins[0].bias.double()
    for lin in lins[1:]:
        w, b = lin.weight.double() @ w, lin.weight.double() @ b + lin.bias.double()
    return w, b


def fake_hub_cache(root: Path, repo_id: str, src: Path) -> None:
    """Put the files of ``src`` into a Hugging Face cache layout under ``root`` as ``repo_id``."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(src, repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")


# ---- prompt sources ----------------------------------------------------------------------

@pytest.mark.math
def test_prompt_files_in_all_three_formats(tmp_path, params):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tlcm.loaders.prompt_sources import read_prompts

    txt = tmp_path / "p.txt"
    txt.write_text("  a red cat \n\n a blue dog\n   \nthe mat\n")
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in [{"TEXT": " a red cat", "x": 1}, {"TEXT": None}, {"TEXT": ""},
                                                       {"TEXT": "a blue dog"}, {"TEXT": "the mat "}]) + "\n\n")
    parquet = tmp_path / "p.parquet"
    pq.write_table(pa.table({"TEXT": ["a red cat", None, "  ", "a blue dog", "the mat"], "AESTHETIC": [6.1] * 5}), parquet)
    for f in (txt, jsonl, parquet):
        p = params.model_copy(update={"prompts": params.prompts.model_copy(update={"source": str(f), "caption_key": "TEXT"})})
        assert read_prompts(p, Paths(tmp_path)) == ["a red cat", "a blue dog", "the mat"], f
        p2 = p.model_copy(update={"prompts": p.prompts.model_copy(update={"limit": 2})})
        assert read_prompts(p2, Paths(tmp_path)) == ["a red cat", "a blue dog"], f


def test_world_prompts_are_the_world_train_captions(tmp_path, params):
    from tasks import world
    from tlcm.loaders.prompt_sources import read_prompts

    paths = Paths(tmp_path)
    with pytest.raises(ArtifactError, match="tlcm stage world"):
        read_prompts(params, paths)
    world.run(params, paths)
    stored = [json.loads(line)["caption"] for line in paths.prompts("train").read_text().splitlines()]
    assert read_prompts(params, paths) == stored and len(stored) == params.world.n_train_prompts
    limited = params.model_copy(update={"prompts": params.prompts.model_copy(update={"limit": 5})})
    assert read_prompts(limited, paths) == stored[:5]


@pytest.mark.math
def test_prompt_file_errors_name_the_file_and_what_to_put(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tlcm.loaders.prompt_sources import read_caption_file

    with pytest.raises(ArtifactError, match=r"prompt file not found: .*nope\.txt.*one caption per line"):
        read_caption_file(tmp_path / "nope.txt")
    with pytest.raises(ArtifactError, match=r"unsupported prompt file type '\.csv'"):
        read_caption_file(tmp_path / "p.csv")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"caption": "ok"}) + "\n" + json.dumps({"text": "no key"}) + "\n")
    with pytest.raises(ArtifactError, match=r"bad\.jsonl: line 2 has no 'caption' field .*'text'.*prompts\.caption_key"):
        read_caption_file(bad)
    pq.write_table(pa.table({"TEXT": ["a"]}), tmp_path / "p.parquet")
    with pytest.raises(ArtifactError, match=r"p\.parquet: no column 'caption' \(columns: \['TEXT'\]\)"):
        read_caption_file(tmp_path / "p.parquet")
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(ArtifactError, match="no captions"):
        read_caption_file(tmp_path / "empty.txt")


def write_coco_captions(path: Path, n_images: int = 10) -> dict[str, set[str]]:
    """A captions_val2017.json-shaped file: images with 1..5 captions (one with none); returns file -> captions."""
    images, anns, truth = [], [], {}
    ann_id = 1000
    for i in range(n_images):
        iid = 500 + 7 * i
        name = f"{iid:012d}.jpg"
        images.append({"id": iid, "file_name": name, "height": 48, "width": 64})
        caps = [f"image {i}  caption {k}\n" for k in range(i % 5)]
        for c in caps:
            anns.append({"image_id": iid, "id": ann_id, "caption": c})
            ann_id += 1
        if caps:
            truth[name] = {" ".join(c.split()) for c in caps}
    path.write_text(json.dumps({"images": images, "annotations": anns[::-1]}))
    return truth


@pytest.mark.math
def test_coco_captions_one_per_image_deterministic_prefix_stable(tmp_path):
    from tlcm.loaders.prompt_sources import read_coco_captions

    truth = write_coco_captions(tmp_path / "captions_val2017.json")
    f = tmp_path / "captions_val2017.json"
    pairs = read_coco_captions(f, len(truth), seed=3)
    assert len(pairs) == len(truth) == len({img for img, _ in pairs})
    assert all(cap in truth[img] for img, cap in pairs)  # each caption belongs to its image, whitespace normalised
    assert read_coco_captions(f, len(truth), seed=3) == pairs
    assert read_coco_captions(f, 3, seed=3) == pairs[:3]
    assert read_coco_captions(f, len(truth), seed=4) != pairs
    with pytest.raises(ArtifactError, match=r"asked for 99 captioned images, the file has 8"):
        read_coco_captions(f, 99, seed=3)
    with pytest.raises(ArtifactError, match=r"COCO captions not found: .*annotations_trainval2017\.zip"):
        read_coco_captions(tmp_path / "missing.json", 3, seed=0)


# ---- tiny real-architecture assets -------------------------------------------------------

@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    """A random tiny ``CLIPModel`` folder with its CLIPTokenizer and preprocessor config."""
    from transformers import CLIPConfig, CLIPModel
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from tlcm.shapes.tokenizer import write_tokenizer

    d = tmp_path_factory.mktemp("clip")
    tok = write_tokenizer(WORDS, d, max_length=16)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=16, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(d)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def aesthetic_head(tmp_path_factory) -> Path:
    """A random aesthetic MLP for the tiny CLIP's 16-d embeddings, saved like the released .pth."""
    torch.manual_seed(1)
    head = AestheticMLP(16)
    for p in head.parameters():
        nn.init.normal_(p, std=0.3)
    f = tmp_path_factory.mktemp("aesthetic") / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(head.state_dict(), f)
    return f


VIT = dict(width=32, depth=2, heads=2, patch=8, image=32, mlp=64)  # head_dim = 16


def random_blip_vit(g: torch.Generator) -> dict[str, torch.Tensor]:
    """A BLIP (timm-style) ViT state dict in the original key layout, random values."""
    d, n = VIT["width"], (VIT["image"] // VIT["patch"]) ** 2 + 1
    r = lambda *s: 0.2 * torch.randn(*s, generator=g)  # noqa: E731
    sd = {"cls_token": r(1, 1, d), "pos_embed": r(1, n, d), "patch_embed.proj.weight": r(d, 3, VIT["patch"], VIT["patch"]),
          "patch_embed.proj.bias": r(d), "norm.weight": 1 + r(d), "norm.bias": r(d)}
    for i in range(VIT["depth"]):
        b = f"blocks.{i}."
        sd |= {b + "norm1.weight": 1 + r(d), b + "norm1.bias": r(d), b + "attn.qkv.weight": r(3 * d, d),
               b + "attn.qkv.bias": r(3 * d), b + "attn.proj.weight": r(d, d), b + "attn.proj.bias": r(d),
               b + "norm2.weight": 1 + r(d), b + "norm2.bias": r(d), b + "mlp.fc1.weight": r(VIT["mlp"], d),
               b + "mlp.fc1.bias": r(VIT["mlp"]), b + "mlp.fc2.weight": r(d, VIT["mlp"]), b + "mlp.fc2.bias": r(d)}
    return sd


def reference_blip_vit(sd: dict[str, torch.Tensor], pixels: torch.Tensor) -> torch.Tensor:
    """BLIP's VisionTransformer.forward written out from its source (timm Block, LayerNorm eps 1e-6)."""
    d, h = VIT["width"], VIT["heads"]
    ln = lambda x, p: F.layer_norm(x, (d,), sd[p + ".weight"], sd[p + ".bias"], eps=1e-6)  # noqa: E731
    x = F.conv2d(pixels, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=VIT["patch"])
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd["cls_token"].expand(len(x), -1, -1), x], 1) + sd["pos_embed"]
    for i in range(VIT["depth"]):
        b = f"blocks.{i}."
        y = ln(x, b + "norm1")
        B, N, C = y.shape
        qkv = F.linear(y, sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"]).reshape(B, N, 3, h, C // h).permute(2, 0, 3, 1, 4)
        att = ((qkv[0] @ qkv[1].transpose(-2, -1)) * (C // h) ** -0.5).softmax(-1)
        y = (att @ qkv[2]).transpose(1, 2).reshape(B, N, C)
        x = x + F.linear(y, sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"])
        y = F.gelu(F.linear(ln(x, b + "norm2"), sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"]))
        x = x + F.linear(y, sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"])
    return ln(x, "norm")


@pytest.fixture(scope="module")
def image_reward_dir(tmp_path_factory) -> Path:
    """ImageReward.pt (original key layout: blip.visual_encoder / blip.text_encoder / mlp, plus the unused
    projections and position_ids buffer), med_config.json and a BERT vocab.txt, all tiny and random."""
    from transformers import BlipTextConfig
    from transformers.models.blip.modeling_blip_text import BlipTextModel

    d = tmp_path_factory.mktemp("image_reward")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n")
    med = {"architectures": ["BertModel"], "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
           "intermediate_size": 48, "vocab_size": len(vocab) + 2, "max_position_embeddings": 40, "hidden_act": "gelu",
           "layer_norm_eps": 1e-12, "pad_token_id": 0, "type_vocab_size": 2, "encoder_width": 32,
           "add_cross_attention": True}
    (d / "med_config.json").write_text(json.dumps(med))
    g = torch.Generator().manual_seed(2)
    torch.manual_seed(2)
    text = BlipTextModel(BlipTextConfig(vocab_size=med["vocab_size"], hidden_size=32, intermediate_size=48,
                                        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=40,
                                        encoder_hidden_size=VIT["width"], is_decoder=True, bos_token_id=None,
                                        eos_token_id=None, sep_token_id=None), add_pooling_layer=False)
    head = AestheticMLP(32)
    for p in head.parameters():
        nn.init.normal_(p, std=0.3, generator=g)
    sd = {f"blip.visual_encoder.{k}": v for k, v in random_blip_vit(g).items()}
    sd |= {f"blip.text_encoder.{k}": v.clone() for k, v in text.state_dict().items()}
    sd |= {f"mlp.{k}": v for k, v in head.state_dict().items()}
    sd |= {"blip.text_encoder.embeddings.position_ids": torch.arange(40)[None], "blip.vision_proj.weight": torch.zeros(8, 32),
           "blip.vision_proj.bias": torch.zeros(8), "blip.text_proj.weight": torch.zeros(8, 32),
           "blip.text_proj.bias": torch.zeros(8)}
    torch.save(sd, d / "ImageReward.pt")
    return d


def random_images(n: int, h: int, w: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


# ---- scorers -----------------------------------------------------------------------------

@pytest.mark.math
def test_clip_score_is_100_times_clamped_cosine():
    img = torch.tensor([[1.0, 0.0], [1.0, 0.0], [3.0, 0.0], [0.0, 2.0]])
    txt = torch.tensor([[0.6, 0.8], [-1.0, 0.0], [2.0, 0.0], [1.0, 1.0]])
    assert torch.allclose(clip_score(img, txt), torch.tensor([60.0, 0.0, 100.0, 100 / 2 ** 0.5]))


@pytest.mark.math
def test_preprocessing_matches_clip_image_processor():
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    proc = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    rng = np.random.default_rng(0)
    for h, w in [(48, 40), (40, 56), (33, 50), (32, 32)]:
        img = (rng.random((h // 4 + 1, w // 4 + 1, 3)) * 255).astype(np.uint8).repeat(4, 0).repeat(4, 1)[:h, :w]
        ref = torch.tensor(np.asarray(proc(images=[img], return_tensors="np")["pixel_values"]))
        mine = ImageTransform(32)(uint8_to_unit(torch.from_numpy(img)[None]))
        assert mine.shape == ref.shape == (1, 3, 32, 32)
        diff = (mine - ref).abs()
        assert float(diff.mean()) < 0.01 and float(diff.max()) < 0.25, (h, w)  # PIL rounds to uint8 mid-way


@pytest.mark.math
def test_clip_scorer_end_to_end(clip_dir):
    from transformers import CLIPModel

    from tlcm.loaders.suite_io import load_clip_scorer

    scorer, tok = load_clip_scorer(str(clip_dir))
    assert scorer.image.transform == ImageTransform(32)  # OpenAI mean/std read from preprocessor_config.json
    images = random_images(4, 40, 48, seed=0)
    t = tok(PROMPTS, padding=True, return_tensors="pt")
    s = scorer(images, t["input_ids"], t["attention_mask"])
    assert s.shape == (4,) and bool(((s >= 0) & (s <= 100)).all())
    assert torch.equal(s, scorer(images, t["input_ids"], t["attention_mask"]))
    # by hand: CLIPModel's own logits are logit_scale * cos
    model = CLIPModel.from_pretrained(clip_dir).eval()
    with torch.no_grad():
        out = model(input_ids=t["input_ids"], attention_mask=t["attention_mask"],
                    pixel_values=scorer.image.transform(images))
    cos = out.logits_per_image.diagonal() / model.logit_scale.exp()
    assert torch.allclose(s, 100 * cos.clamp(min=0), atol=1e-4)
    # differentiable in the pixels (through the cosine; the clamp at 0 has zero gradient where it binds)
    x = images.clone().requires_grad_(True)
    (scorer.image(x) * scorer.text_embeds(t["input_ids"], t["attention_mask"])).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.math
def test_aesthetic_scorer_end_to_end(clip_dir, aesthetic_head):
    from transformers import CLIPModel

    from tlcm.loaders.suite_io import load_aesthetic_scorer

    scorer = load_aesthetic_scorer(str(clip_dir), str(aesthetic_head))
    images = random_images(3, 36, 30, seed=1)
    s = scorer(images)
    assert s.shape == (3,) and torch.equal(s, scorer(images))
    model = CLIPModel.from_pretrained(clip_dir).eval()
    with torch.no_grad():
        emb = model(input_ids=torch.zeros(1, 2, dtype=torch.long), pixel_values=scorer.embedder.transform(images)).image_embeds
    head = AestheticMLP(16)
    head.load_state_dict(torch.load(aesthetic_head, weights_only=True))
    w, b = affine_of(head)
    by_hand = (F.normalize(emb.double(), dim=-1) @ w.T + b).squeeze(-1)  # MLP on L2-normalised embeddings
    assert torch.allclose(s.double(), by_hand, atol=1e-4)
    x = images.clone().requires_grad_(True)
    scorer(x).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.math
def test_aesthetic_loader_errors(tmp_path, clip_dir, aesthetic_head):
    from tlcm.loaders.suite_io import load_aesthetic_scorer

    with pytest.raises(ArtifactError, match=r"suite\.aesthetic_head: .*missing\.pth.*improved-aesthetic-predictor"):
        load_aesthetic_scorer(str(clip_dir), str(tmp_path / "missing.pth"))
    torch.save(AestheticMLP(768).state_dict(), tmp_path / "l14.pth")
    with pytest.raises(ArtifactError, match=r"expects 768-d embeddings but suite\.aesthetic_clip gives 16-d"):
        load_aesthetic_scorer(str(clip_dir), str(tmp_path / "l14.pth"))
    with pytest.raises(ArtifactError, match=r"suite\.aesthetic_clip: no config\.json in .*nowhere.*clip-vit-large-patch14"):
        load_aesthetic_scorer(str(tmp_path / "nowhere"), str(aesthetic_head))


def test_image_reward_maps_the_released_layout_and_scores(image_reward_dir):
    from tlcm.loaders.suite_io import load_image_reward

    net, tok = load_image_reward(str(image_reward_dir), head_dim=16)
    sd = torch.load(image_reward_dir / "ImageReward.pt", weights_only=True)
    vit = {k.removeprefix("blip.visual_encoder."): v for k, v in sd.items() if k.startswith("blip.visual_encoder.")}
    images = random_images(2, 40, 32, seed=3)
    pixels = net.transform(images)
    with torch.no_grad():
        tokens = net.vision(pixel_values=pixels).last_hidden_state
        assert torch.allclose(tokens, reference_blip_vit(vit, pixels), atol=1e-5)  # the ViT key mapping is exact
    text_sd = net.text.state_dict()
    assert all(torch.equal(text_sd[k.removeprefix("blip.text_encoder.")], v) for k, v in sd.items()
               if k.startswith("blip.text_encoder.") and not k.endswith("position_ids"))
    t = tok(PROMPTS[:2], padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    assert t["input_ids"][0, 0] == tok.cls_token_id  # ImageReward scores with [CLS] first (no [ENC] swap)
    r = net(images, t["input_ids"], t["attention_mask"])
    assert r.shape == (2,) and torch.equal(r, net(images, t["input_ids"], t["attention_mask"]))
    with torch.no_grad():  # by hand: (MLP([CLS] of the cross-attending text encoder) - mean) / std
        cls = net.text(input_ids=t["input_ids"], attention_mask=t["attention_mask"], encoder_hidden_states=tokens,
                       encoder_attention_mask=torch.ones(tokens.shape[:2], dtype=torch.long)).last_hidden_state[:, 0]
    w, b = affine_of(net.head)
    assert torch.allclose(r.double(), ((cls.double() @ w.T + b).squeeze(-1) - IMAGEREWARD_MEAN) / IMAGEREWARD_STD, atol=1e-5)
    with torch.no_grad():  # the image matters: cross-attention is wired in
        other = net(random_images(2, 40, 32, seed=4), t["input_ids"], t["attention_mask"])
    assert not torch.allclose(r, other)
    x = images.clone().requires_grad_(True)
    net(x, t["input_ids"], t["attention_mask"]).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.math
def test_image_reward_loader_errors(tmp_path, image_reward_dir):
    from tlcm.loaders.suite_io import load_image_reward

    with pytest.raises(ArtifactError, match=r"suite\.image_reward: .*ImageReward\.pt' not found.*hf download THUDM/ImageReward"):
        load_image_reward(str(tmp_path))
    sd = torch.load(image_reward_dir / "ImageReward.pt", weights_only=True)
    with pytest.raises(KeyError, match="unexpected ImageReward key 'blip.itm_head.weight'"):
        imagereward_state_dicts(sd | {"blip.itm_head.weight": torch.zeros(2)})
    broken = tmp_path / "broken"
    broken.mkdir()
    torch.save({k: v for k, v in sd.items() if "blocks.1.mlp.fc2" not in k}, broken / "ImageReward.pt")
    (broken / "med_config.json").write_text((image_reward_dir / "med_config.json").read_text())
    with pytest.raises(ArtifactError, match=r"suite\.image_reward \(vision\).*missing \['encoder\.layers\.1\.mlp\.fc2"):
        load_image_reward(str(broken), head_dim=16)
    no_vocab = tmp_path / "no_vocab"
    no_vocab.mkdir()
    for f in ("ImageReward.pt", "med_config.json"):
        (no_vocab / f).write_bytes((image_reward_dir / f).read_bytes())
    with pytest.raises(ArtifactError, match=r"ImageReward tokenizer: .*not in the Hugging Face cache.*bert-base-uncased"):
        load_image_reward(str(no_vocab), tokenizer_source="nobody/no-bert", head_dim=16)


@pytest.mark.math
def test_hub_ids_resolve_from_the_cache_only(tmp_path, clip_dir, monkeypatch):
    import huggingface_hub.constants

    from tlcm.loaders.suite_io import load_clip_scorer

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ArtifactError, match=r"hub id 'someone/clip' is not in the Hugging Face cache.*hf download someone/clip"):
        load_clip_scorer("someone/clip")
    fake_hub_cache(tmp_path, "someone/clip", clip_dir)
    scorer, tok = load_clip_scorer("someone/clip")
    t = tok(PROMPTS[:1], return_tensors="pt")
    assert scorer(random_images(1, 32, 32, 5), t["input_ids"], t["attention_mask"]).shape == (1,)


# ---- FID and the suite -------------------------------------------------------------------

class MeanColour(nn.Module):
    """Stands in for the TorchScript Inception (same call: uint8 NCHW, return_features=True)."""

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return x.float().mean(dim=(2, 3)) / 255.0


def fid_by_hand(a: np.ndarray, b: np.ndarray) -> float:
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real))


def coco_fixture(root: Path, n: int, seed: int) -> tuple[Path, Path, np.ndarray]:
    """COCO-shaped captions + flat-colour PNGs (non-square, so crop + resize runs); returns the colours by file."""
    captions, images = root / "captions_val2017.json", root / "val2017"
    images.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    ims, anns, colours = [], [], {}
    for i in range(n):
        name = f"{i:012d}.png"
        ims.append({"id": i, "file_name": name})
        anns.append({"image_id": i, "id": 100 + i, "caption": PROMPTS[i % len(PROMPTS)]})
        colours[name] = rng.integers(0, 256, 3).astype(np.uint8)
        Image.fromarray(np.broadcast_to(colours[name], (24, 40, 3)).copy()).save(images / name)
    captions.write_text(json.dumps({"images": ims, "annotations": anns}))
    return captions, images, colours


@pytest.mark.math
def test_inception_loader(tmp_path):
    from tlcm.loaders.suite_io import INCEPTION_URL, load_inception

    with pytest.raises(ArtifactError, match=f"not found: .*inception.pt'; download {INCEPTION_URL}"):
        load_inception(str(tmp_path / "inception.pt"))
    torch.jit.save(torch.jit.script(MeanColour()), tmp_path / "inception.pt")
    feats = load_inception(str(tmp_path / "inception.pt"))
    assert feats.num_features == 3
    x = torch.full((2, 3, 10, 10), 51, dtype=torch.uint8)
    assert torch.allclose(feats(x), torch.full((2, 3), 0.2, dtype=torch.float64))
    (tmp_path / "bad.pt").write_bytes(b"not torchscript")
    with pytest.raises(ArtifactError, match="is not the TorchScript detector"):
        load_inception(str(tmp_path / "bad.pt"))


def test_run_suite_all_metrics_and_fid_by_hand(tmp_path, params, clip_dir, aesthetic_head, image_reward_dir, monkeypatch):
    from tasks.suite import ImageSet, run_suite, suite_pairs, suite_prompts
    from tlcm.loaders import suite_io

    n = 12
    captions, images, colours = coco_fixture(tmp_path / "coco", n, seed=0)
    torch.jit.save(torch.jit.script(MeanColour()), tmp_path / "inception.pt")
    p = with_suite(params, coco_captions=str(captions), coco_images=str(images), n_images=n, clip_model=str(clip_dir),
                   aesthetic_clip=str(clip_dir), aesthetic_head=str(aesthetic_head), image_reward=str(image_reward_dir),
                   batch_size=5, fid_inception=str(tmp_path / "inception.pt"))
    pairs = suite_pairs(p)
    assert [c for _, c in pairs] == suite_prompts(p) and len(pairs) == n
    rng = np.random.default_rng(1)
    fake_colours = rng.integers(0, 256, (n, 3)).astype(np.uint8)
    fake = np.broadcast_to(fake_colours[:, None, None, :], (n, 32, 32, 3)).copy()
    real = np.stack([np.broadcast_to(colours[f], (32, 32, 3)) for f, _ in pairs])
    rows = [ImageSet("fake", 4, fake, suite_prompts(p)), ImageSet("real copy", 0, real, suite_prompts(p))]
    paths = Paths(tmp_path / "artifacts")
    res = run_suite(p, paths, rows)  # (ImageReward loads with the default head width 64: one head on this tiny ViT)
    assert [(r["method"], r["steps"], r["n_images"]) for r in res] == [("fake", 4, n), ("real copy", 0, n)]
    for r in res:
        assert set(r) == {"method", "steps", "n_images", "clip_score", "aesthetic", "image_reward", "fid"}
        assert 0 <= r["clip_score"] <= 100 and all(np.isfinite(r[k]) for k in ("aesthetic", "image_reward"))
    by_hand = fid_by_hand(real.reshape(n, -1, 3).mean(1) / 255.0, fake_colours / 255.0)
    assert res[0]["fid"] == pytest.approx(by_hand, rel=1e-4, abs=1e-6)
    assert abs(res[1]["fid"]) < 1e-6  # the reference against itself
    # the CLIP score of a row is the mean of the per-image scores
    scorer, tok = suite_io.load_clip_scorer(str(clip_dir))
    t = tok(suite_prompts(p), padding=True, return_tensors="pt")
    with torch.no_grad():
        per_image = scorer(uint8_to_unit(torch.from_numpy(fake)), t["input_ids"], t["attention_mask"])
    assert res[0]["clip_score"] == pytest.approx(float(per_image.mean()), abs=1e-4)
    # the reference statistics are cached: a rerun does not read the COCO images again
    assert len(list((paths.root / "suite").glob("fid_reference_*.safetensors"))) == 1
    monkeypatch.setattr(suite_io.ImageFiles, "batches", lambda self, bs: (_ for _ in ()).throw(AssertionError("re-read")))
    again = run_suite(with_suite(p, clip_model=None, aesthetic_clip=None, image_reward=None), paths, rows[:1])
    assert again == [{"method": "fake", "steps": 4, "n_images": n, "fid": res[0]["fid"]}]



def test_run_suite_fid_clip_without_inception(tmp_path, params, clip_dir):
    from tasks.suite import ImageSet, run_suite, suite_pairs

    n = 24  # more images than the tiny CLIP's 16 embedding dims
    captions, images, colours = coco_fixture(tmp_path / "coco", n, seed=2)
    p = with_suite(params, coco_captions=str(captions), coco_images=str(images), n_images=n, clip_model=str(clip_dir))
    pairs = suite_pairs(p)
    real = np.stack([np.broadcast_to(colours[f], (32, 32, 3)) for f, _ in pairs])
    noise = np.random.default_rng(3).integers(0, 256, (n, 32, 32, 3)).astype(np.uint8)
    prompts = [c for _, c in pairs]
    res = run_suite(p, Paths(tmp_path / "a"), [ImageSet("same", 1, real, prompts), ImageSet("noise", 1, noise, prompts)])
    assert set(res[0]) == {"method", "steps", "n_images", "clip_score", "fid_clip"}  # labelled FID-CLIP, never "fid"
    assert abs(res[0]["fid_clip"]) < 1e-4 < res[1]["fid_clip"]


@pytest.mark.math
def test_run_suite_checks_its_rows(tmp_path, params):
    from tasks.suite import ImageSet, run_suite

    with pytest.raises(ValueError, match=r"x@2: 3 images for 2 prompts"):
        run_suite(params, Paths(tmp_path), [ImageSet("x", 2, np.zeros((3, 8, 8, 3), np.uint8), ["a", "b"])])
    with pytest.raises(ValueError, match="must be uint8"):
        run_suite(params, Paths(tmp_path), [ImageSet("x", 2, np.zeros((2, 8, 8, 3), np.float32), ["a", "b"])])
    with pytest.raises(ArtifactError, match=r"suite\.coco_images: 1 of 2 images missing, e\.g\. .*000000000001\.png.*val2017\.zip"):
        captions, images, _ = coco_fixture(tmp_path / "coco", 2, seed=0)
        (images / "000000000001.png").unlink()
        torch.jit.save(torch.jit.script(MeanColour()), tmp_path / "inception.pt")
        p = with_suite(params, coco_captions=str(captions), coco_images=str(images), n_images=2,
                       fid_inception=str(tmp_path / "inception.pt"))
        run_suite(p, Paths(tmp_path), [ImageSet("x", 2, np.zeros((2, 8, 8, 3), np.uint8), ["a", "b"])])


# ---- preflight ---------------------------------------------------------------------------

@pytest.mark.math
def test_preflight_passes_on_the_embedded_default(params):
    from tools.preflight import check_assets

    assert check_assets(params) == [] and check_assets(load_params(REPO / "params.yaml")) == []


@pytest.mark.math
def test_preflight_names_every_missing_asset(tmp_path, params, monkeypatch):
    import huggingface_hub.constants

    from tools.preflight import check_assets, require_assets

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    p = params.model_copy(update={
        "teacher": params.teacher.model_copy(update={"source": Source(location="someone/sdxl")}),
        "bapps": params.bapps.model_copy(update={"source": str(tmp_path / "bapps")}),
        "prompts": params.prompts.model_copy(update={"source": str(tmp_path / "laion.parquet")}),
        "suite": params.suite.model_copy(update={"clip_model": "laion/CLIP-ViT-g-14-laion2B-s12B-b42K",
                                                 "aesthetic_head": str(tmp_path / "head.pth"),
                                                 "coco_images": str(tmp_path / "val2017")})})
    problems = check_assets(p)
    expected = ["hub id 'someone/sdxl' is not in the Hugging Face cache", "BAPPS (bapps.source)", "laion.parquet", "val2017",
                "hf download laion/CLIP-ViT-g-14-laion2B-s12B-b42K", "head.pth"]
    assert len(problems) == len(expected) and all(e in pr for e, pr in zip(expected, problems)), problems
    with pytest.raises(ArtifactError, match=r"6 asset\(s\) missing, nothing was run"):
        require_assets(p)
    # now provide them: a cached teacher with UNet weights, a BAPPS layout, the files
    src = tmp_path / "teacher_src"
    (src / "unet").mkdir(parents=True)
    (src / "model_index.json").write_text(json.dumps({"unet": ["diffusers", "UNet2DConditionModel"]}))
    fake_hub_cache(tmp_path / "hf", "someone/sdxl", src)
    assert "no UNet weight file" in check_assets(p)[0]
    snap = next((tmp_path / "hf").glob("models--someone--sdxl/snapshots/*"))
    (snap / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"x")
    for split in ("train", "val"):
        (tmp_path / "bapps" / "2afc" / split / "traditional").mkdir(parents=True)
    (tmp_path / "laion.parquet").write_bytes(b"x")
    (tmp_path / "head.pth").write_bytes(b"x")
    (tmp_path / "val2017").mkdir()
    clip_src = tmp_path / "clip_src"
    clip_src.mkdir()
    (clip_src / "config.json").write_text("{}")
    fake_hub_cache(tmp_path / "hf", "laion/CLIP-ViT-g-14-laion2B-s12B-b42K", clip_src)
    assert check_assets(p) == []


@pytest.mark.math
def test_preflight_accepts_a_converted_mps_folder_and_names_a_missing_or_untrusted_one(tmp_path, params):
    """reward.source as the sdxl preset sets it: the folder `tlcm convert-mps` writes (before: preflight took only a
    file, so that folder was reported missing and `tlcm run --preset sdxl` stopped)."""
    from safetensors.torch import save_file

    from tools.preflight import check_assets

    def with_reward(source):
        return params.model_copy(update={"reward": params.reward.model_copy(update={"source": Source(location=source)})})

    folder = tmp_path / "mps_overall"
    problems = check_assets(with_reward(str(folder)))
    assert len(problems) == 1 and problems[0].startswith(
        f"MPS reward checkpoint (reward.source): MPS checkpoint not found: {folder}; point reward.source at a folder "
        "made by `tlcm convert-mps`"), problems
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"kind": "mps"}))
    save_file({"w": torch.zeros(1)}, str(folder / "model.safetensors"))
    assert check_assets(with_reward(str(folder))) == []
    (tmp_path / "MPS_overall_checkpoint.pth").write_bytes(b"x")
    problems = check_assets(with_reward(str(tmp_path / "MPS_overall_checkpoint.pth")))
    assert len(problems) == 1 and "refusing to unpickle" in problems[0], problems


def test_tlcm_run_sdxl_fails_fast_naming_the_teacher(tmp_path):
    t0 = time.monotonic()
    r = run_cli("run", "--preset", "sdxl", "--artifacts", str(tmp_path / "artifacts"),
                env={"HF_HUB_CACHE": str(tmp_path / "hf"), "TLCM_TRACKING": "0"}, timeout=120)
    elapsed = time.monotonic() - t0
    assert r.returncode == 2, r.stderr
    assert "teacher weights (teacher.source): hub id 'stabilityai/stable-diffusion-xl-base-1.0'" in r.stderr
    assert "hf download stabilityai/stable-diffusion-xl-base-1.0" in r.stderr and "nothing was run" in r.stderr
    assert elapsed < 60 and not (tmp_path / "artifacts").exists()
