"""Full-size SD1.5 and SDXL from single-file checkpoints (random weights, the original key layout): one training step."""
import logging

import pytest
import torch
from safetensors.torch import save_file

from ipadapter.adapter_file import load_adapter
from ipadapter.encoder import build_vision_tower
from training.data import write_toy_dataset
from training.run import main

pytestmark = pytest.mark.slow


def train_one_step(tmp_path, *model_args: str) -> dict:
    """One step on 2 toy images at 64 px with a narrow encoder of ViT-H's layout (1024-d embeddings)."""
    encoder = tmp_path / "vit_h_layout.safetensors"
    tower = build_vision_tower("ViT-H-14", width=64, layers=2, head_width=16, embed_dim=1024)
    save_file({f"visual.{k}": v.contiguous() for k, v in tower.visual.state_dict().items()}, str(encoder))
    data = write_toy_dataset(tmp_path / "toy", count=2)
    return main([
        *model_args, "--model.image_encoder", str(encoder), "--data.path", str(data),
        "--train.output_dir", str(tmp_path / "out"), "--train.max_steps", "1", "--train.batch_size", "1",
        "--data.resolution", "64", "--data.num_workers", "0", "--sample.every", "0", "--train.progress", "false",
    ])


def test_single_file_sd15_trains_and_exports_a_full_size_adapter(comfy, tmp_path, caplog):
    from devtools.comfyui_harness import sd15_checkpoint_path

    caplog.set_level(logging.INFO, logger="training")
    result = train_one_step(tmp_path, "--model.base", str(sd15_checkpoint_path()))
    assert "trainable parameters: 22,319,616" in caplog.text
    assert torch.isfinite(torch.tensor(result["history"])).all()
    exported = load_adapter(result["export"][0])  # validated against the full SD1.5 widths (base 320)
    assert exported.num_parameters() == 22_319_616 and exported.spec.encoder_width == 1024


def test_single_file_sdxl_trains_and_exports_a_full_size_vit_h_adapter_in_bf16(comfy, tmp_path, caplog):
    """SDXL base (2.6 B UNet, both text encoders) from the original single file, in bf16 (fp32 would not fit
    beside the 349 M fp32 adapter weights and their AdamW state on a 24 GiB machine): one step, an SDXL export."""
    from devtools.comfyui_harness import sdxl_checkpoint_path

    caplog.set_level(logging.INFO, logger="training")
    result = train_one_step(tmp_path, "--model.base", str(sdxl_checkpoint_path()), "--model.frozen_dtype", "bf16",
                            "--train.export_formats", "safetensors")
    layers = 2 * 2048 * (10 * 640 + 60 * 1280)  # 70 x (to_k_ip, to_v_ip)
    expected = layers + 1024 * 4 * 2048 + 4 * 2048 + 2 * 2048  # + the projection to 4 tokens of 2048 and its LayerNorm
    assert f"trainable parameters: {expected:,} (SDXL base adapter" in caplog.text
    assert torch.isfinite(torch.tensor(result["history"])).all()
    export = result["export"][0]
    assert export.name == "ip-adapter_sdxl_vit-h_step00000001.safetensors"
    exported = load_adapter(export)  # validated against the full SDXL widths (base 320)
    assert exported.spec.family == "SDXL" and exported.num_parameters() == expected
