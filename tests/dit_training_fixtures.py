"""The DiT trainer's runs on tiny random models (CPU, 2 steps), shared by the tests that check them: trained once
per session, read by tests/test_training_dit.py (diffusers, the released layouts) and tests/test_training_dit_comfy.py
(our ComfyUI nodes). Import the fixtures by name into a test module."""
import math
import shutil

import pytest

from devtools.dit_models import (TRAINER_FLUX, build_diffusers_flux, write_tiny_clip_encoder, write_tiny_siglip_encoder,
                                 write_trainer_folder)
from ipadapter.registry import family_by_id
from training.data import write_toy_dataset
from training.run import main

COMMON = ["--data.resolution", "32", "--data.num_workers", "0", "--train.batch_size", "2", "--train.max_steps", "2",
          "--train.log_every", "1", "--train.progress", "false", "--sample.every", "0", "--train.export_dtype", "fp32"]
SIGLIP_WIDTH = 144  # the tiny SigLIP's hidden states and pooled output


def write_full_depth_flux(source, target):
    """A copy of a trainer Flux folder whose transformer has all of Flux.1's single blocks (InstantX patches them)."""
    shutil.copytree(source, target)
    singles = len(family_by_id("flux").preset_keys("single blocks"))
    shutil.rmtree(target / "transformer")
    transformer = build_diffusers_flux(0, **{**TRAINER_FLUX, "num_single_layers": singles})
    transformer.save_pretrained(str(target / "transformer"))
    return target


@pytest.fixture(scope="session")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("dit")
    flux = write_trainer_folder(root / "flux", family_by_id("flux"))
    return {"flux": flux, "flux-57": write_full_depth_flux(flux, root / "flux-57"),
            "sd35": write_trainer_folder(root / "sd35", family_by_id("sd35")),
            "clip": write_tiny_clip_encoder(root / "clip.safetensors"),
            "siglip": write_tiny_siglip_encoder(root / "siglip.safetensors"),
            "data": write_toy_dataset(root / "data", 6), "root": root}


def train(files, base, encoder, width, variant, *extra):
    out = files["root"] / f"out-{base}-{variant}"
    result = main(["--model.base", str(files[base]), "--model.image_encoder", str(files[encoder]),
                   "--model.encoder_embed_dim", str(width), "--model.variant", variant, "--data.path",
                   str(files["data"]), "--train.output_dir", str(out), *COMMON, *extra])
    assert result["step"] == 2 and all(math.isfinite(loss) for loss in result["history"]), result["history"]
    return result


@pytest.fixture(scope="session")
def xlabs(files):
    return train(files, "flux", "clip", 32, "xlabs", "--model.num_tokens", "4")


@pytest.fixture(scope="session")
def instantx(files):
    return train(files, "sd35", "siglip", SIGLIP_WIDTH, "instantx")


@pytest.fixture(scope="session")
def instantx_flux(files):
    return train(files, "flux-57", "siglip", SIGLIP_WIDTH, "instantx")
