"""``tlcm export``: each format loads with the loader its users use and computes the trained student.

kohya goes through diffusers' non-diffusers (kohya/sgm) converter, peft through the official TLCM
inference script's ``get_peft_model`` + ``unet.load_adapter``; no module may be dropped (diffusers only
warns about unknown keys: any such warning fails here, and the adapted module sets must be equal)."""
import json
import logging
import re

import pytest
import torch
from conftest import run_cli
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from scheduler_common import captured

from models.denoiser import Denoiser, encode_prompts
from models.lora import LORA_TARGETS
from models.lora_formats import lora_modules, sgm_module_name, to_kohya
from tools.export import export
from tlcm.loaders.lora_io import load_lora_into
from tlcm.core.storage import ArtifactError, load_tensors

PROMPTS = ["a red circle left of a blue square on a white background", "a small red cross on the left on a black background"]


def _eps(unet, pipe) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    z, t = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([700, 120])
    with torch.no_grad():
        return Denoiser(unet, None).eps(z, t, encode_prompts(pipe, PROMPTS))


@pytest.fixture(scope="module")
def student(smoke_artifacts, perturbed_lora):
    """ε of the trained student (the LoRA loaded the way training resumes it) and of the plain teacher."""
    pipe = StableDiffusionXLPipeline.from_pretrained(smoke_artifacts.teacher)
    plain = _eps(pipe.unet, pipe)
    load_lora_into(pipe.unet, perturbed_lora)
    eps = _eps(pipe.unet, pipe)
    assert (eps - plain).abs().max() > 1e-2  # the LoRA matters, so a dropped module would show
    return {"eps": eps, "modules": lora_modules(load_tensors(perturbed_lora / "pytorch_lora_weights.safetensors"))}


def _no_dropped_keys(log: str) -> None:
    """diffusers' warnings when a LoRA file's keys do not all land in the model (peft_utils)."""
    assert not re.search(r"led to (unexpected|missing) keys|not correctly renamed", log), log


def test_kohya_file_loads_in_diffusers_with_every_module_and_matches_the_student(smoke_artifacts, perturbed_lora,
                                                                                 student, tmp_path):
    out = export(str(perturbed_lora), "kohya", tmp_path / "tlcm.safetensors", str(smoke_artifacts.teacher))
    with safe_open(str(out), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert all(k.startswith("lora_unet_") and k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in keys)
    assert any("_input_blocks_" in k for k in keys) and not any("_down_blocks_" in k for k in keys)  # sgm names (SDXL)
    assert len([k for k in keys if k.endswith(".alpha")]) == len(student["modules"])
    assert meta["ss_network_dim"] == "4" and float(meta["ss_network_alpha"]) == 4.0

    pipe = StableDiffusionXLPipeline.from_pretrained(smoke_artifacts.teacher)
    with captured("diffusers") as log:
        pipe.load_lora_weights(str(out), adapter_name="kohya")
    _no_dropped_keys(log.getvalue())
    loaded = get_peft_model_state_dict(pipe.unet, adapter_name="kohya")
    assert lora_modules({f"unet.{k}": v for k, v in loaded.items()}) == student["modules"]
    diff = (_eps(pipe.unet, pipe) - student["eps"]).abs().max().item()
    print(f"kohya via load_lora_weights: max |Δε| = {diff:.2e}")
    assert diff <= 1e-4


def test_kohya_alpha_carries_the_trained_scale(smoke_artifacts, perturbed_lora, student, tmp_path):
    """A LoRA trained with alpha ≠ rank: the file's .alpha tensors give diffusers the same function."""
    sd = load_tensors(perturbed_lora / "pytorch_lora_weights.safetensors")
    meta = json.loads((perturbed_lora / "tlcm_lora.json").read_text())
    halved = tmp_path / "halved"
    halved.mkdir()
    from safetensors.torch import save_file

    save_file({k: v * 2 if ".lora_B." in k else v for k, v in sd.items()}, str(halved / "pytorch_lora_weights.safetensors"))
    (halved / "tlcm_lora.json").write_text(json.dumps({**meta, "lora_alpha": 2}))  # scale 2/4 on a doubled B
    out = export(str(halved), "kohya", tmp_path / "h.safetensors", str(smoke_artifacts.teacher))
    pipe = StableDiffusionXLPipeline.from_pretrained(smoke_artifacts.teacher)
    pipe.load_lora_weights(str(out))
    assert (_eps(pipe.unet, pipe) - student["eps"]).abs().max() <= 1e-4


def test_peft_folder_loads_as_the_official_tlcm_script_loads_it(smoke_artifacts, perturbed_lora, student, tmp_path):
    out = export(str(perturbed_lora), "peft", tmp_path / "peft", str(smoke_artifacts.teacher))
    assert {p.name for p in out.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    pipe = StableDiffusionXLPipeline.from_pretrained(smoke_artifacts.teacher)
    # the official inference.py: get_peft_model(unet, LoraConfig(r, target_modules)) then unet.load_adapter(path)
    unet = UNet2DConditionModel.from_pretrained(smoke_artifacts.teacher, subfolder="unet")
    unet = get_peft_model(unet, LoraConfig(r=4, target_modules=list(LORA_TARGETS)))
    res = unet.load_adapter(str(out), adapter_name="default")
    assert not [k for k in res.missing_keys if "lora_" in k] and not res.unexpected_keys
    official = (_eps(unet, pipe) - student["eps"]).abs().max().item()
    # and with the folder's own adapter_config.json
    unet2 = PeftModel.from_pretrained(UNet2DConditionModel.from_pretrained(smoke_artifacts.teacher, subfolder="unet"), str(out))
    from_config = (_eps(unet2, pipe) - student["eps"]).abs().max().item()
    print(f"peft via load_adapter: max |Δε| = {official:.2e}; via PeftModel.from_pretrained: {from_config:.2e}")
    assert official <= 1e-4 and from_config <= 1e-4


def test_diffusers_folder_and_cli(smoke_artifacts, perturbed_lora, student, tmp_path):
    r = run_cli("export", str(perturbed_lora), "--format", "diffusers", "--out", str(tmp_path / "d"),
                "--teacher", str(smoke_artifacts.teacher))
    assert r.returncode == 0, r.stderr
    pipe = StableDiffusionXLPipeline.from_pretrained(smoke_artifacts.teacher)
    with captured("diffusers") as log:
        pipe.load_lora_weights(tmp_path / "d")
    _no_dropped_keys(log.getvalue())
    assert (_eps(pipe.unet, pipe) - student["eps"]).abs().max() <= 1e-4
    r = run_cli("export", str(perturbed_lora), "--format", "kohya", "--out", str(tmp_path / "x.bin"),
                "--teacher", str(smoke_artifacts.teacher))
    assert r.returncode == 2 and "one .safetensors file" in r.stderr, r.stderr


def test_failed_export_leaves_the_previous_output(smoke_artifacts, perturbed_lora, tmp_path):
    out = export(str(perturbed_lora), "kohya", tmp_path / "t.safetensors", str(smoke_artifacts.teacher))
    before = out.read_bytes()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tlcm_lora.json").write_text((perturbed_lora / "tlcm_lora.json").read_text())
    (bad / "pytorch_lora_weights.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ArtifactError, match="corrupt"):
        export(str(bad), "kohya", out, str(smoke_artifacts.teacher))
    assert out.read_bytes() == before and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("arch", ["sdxl", "sd15"])
def test_kohya_names_map_back_through_diffusers_converter_on_full_size_unets(arch):
    """Every module of the real SDXL (sgm names) and SD1.5 (diffusers names) UNets survives diffusers'
    own kohya converter: the key-level round trip, on meta-device UNets (no weights)."""
    from diffusers.utils import convert_unet_state_dict_to_peft

    from tools.plan.configs import SDXL_UNET_CONFIG, attach_lora, build_unet

    cfg = dict(SDXL_UNET_CONFIG) if arch == "sdxl" else dict(  # runwayml/stable-diffusion-v1-5's UNet
        sample_size=64, cross_attention_dim=768, block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    unet = build_unet(cfg, torch.float32)
    attach_lora(unet, 4)
    names = sorted({n.rsplit(".lora_A", 1)[0] for n, _ in unet.named_parameters() if ".lora_A." in n})
    sd = {f"unet.{m}.lora_{ab}.weight": torch.zeros(1, 1) for m in names for ab in "AB"}
    kohya = to_kohya(sd, 4.0, unet.config)
    assert len(kohya) == 3 * len(names)
    if arch == "sdxl":  # names as kohya-ss writes them for SDXL
        assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.alpha" in kohya
        assert "lora_unet_output_blocks_2_2_conv.alpha" in kohya and "lora_unet_input_blocks_3_0_op.alpha" in kohya
        assert sgm_module_name("mid_block.resnets.1.conv_shortcut", 2) == "middle_block.2.skip_connection"
    converted, alphas = StableDiffusionXLPipeline.lora_state_dict(kohya, unet_config=unet.config)
    peft_keys = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in converted.items()})
    assert lora_modules({f"unet.{k}": v for k, v in peft_keys.items()}) == names
    assert len(alphas) == len(names) and set(alphas.values()) == {4.0}
