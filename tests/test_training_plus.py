"""The plus variant (the authors' tutorial_train_plus.py) on the embedded models: export, init, resume, diffusers."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from ipadapter.adapter_file import load_adapter
from training.adapter import IPAdapterModel, start_from_adapter_file
from training.run_files import export_adapter
from training.data import write_toy_dataset
from ipadapter.registry.families import SD15
from training.models import ModelFileError, build_embedded_models, seeded
from training.run import main
from training.variants import adapter_spec

from test_training import _copy_unet, small_run_args

SEED = 42  # train.seed: the embedded run's models and the projection's initialisation


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory) -> Path:
    return write_toy_dataset(tmp_path_factory.mktemp("toy"), count=8, seed=1)


@pytest.fixture(scope="module")
def plus_run(tmp_path_factory, toy_data):
    """3 steps of the plus variant, a training state at step 2, sample grids at step 3."""
    output = tmp_path_factory.mktemp("plus")
    result = main(small_run_args(output, toy_data, 3, **{"model.variant": "plus", "sample.every": 3, "sample.steps": 2}))
    return output, result


def plus_model(frozen) -> IPAdapterModel:
    """The model a plus run starts from (same spec, same seeded initialisation)."""
    encoder = frozen.image_encoder
    spec = adapter_spec("plus", None, encoder.embed_dim, encoder.hidden_width, frozen.unet)
    with seeded(SEED):
        return IPAdapterModel(frozen.unet, spec=spec)


def test_plus_run_exports_an_sd15_plus_adapter_with_trained_resampler(plus_run):
    output, result = plus_run
    assert all(torch.isfinite(torch.tensor(result["history"])))
    safetensors_path, bin_path = result["export"]
    assert safetensors_path.name == "ip-adapter-plus_sd15_step00000003.safetensors"
    checkpoint = load_adapter(safetensors_path, base_width=None)
    spec = checkpoint.spec
    assert (spec.family, spec.variant, spec.num_tokens, spec.encoder_input) == ("SD1.5", "plus", 16, "penultimate")
    assert spec.encoder_width == build_embedded_models(SD15).image_encoder.hidden_width  # the encoder's own width (64 here)
    assert spec.resampler == {"dim": 768, "depth": 4, "dim_head": 64, "heads": 12, "ff_mult": 4}
    assert load_adapter(bin_path, base_width=None).spec == spec
    expected = {"latents", "proj_in.weight", "proj_in.bias", "proj_out.weight", "proj_out.bias", "norm_out.weight", "norm_out.bias"}
    for i in range(4):
        expected |= {f"layers.{i}.0.{name}" for name in ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias",
                                                          "to_q.weight", "to_kv.weight", "to_out.weight")}
        expected |= {f"layers.{i}.1.0.weight", f"layers.{i}.1.0.bias", f"layers.{i}.1.1.weight", f"layers.{i}.1.3.weight"}
    assert set(checkpoint.image_proj) == expected and len(checkpoint.ip_adapter) == 32
    with safe_open(str(safetensors_path), "pt") as handle:
        assert handle.metadata()["variant"] == "plus"

    trained = torch.load(output / "state" / "step-00000003" / "adapter.pt", weights_only=True)
    initial = plus_model(build_embedded_models(SD15, seed=SEED)).trainable_state_dict()
    assert trained.keys() == initial.keys()
    unchanged = [key for key in initial if key.startswith("image_proj.") and torch.equal(trained[key], initial[key])]
    assert not unchanged
    assert (output / "samples" / "step-00000003.png").is_file()


def test_plus_export_loads_in_diffusers_with_the_same_outputs(plus_run):
    from diffusers import StableDiffusionPipeline

    output, result = plus_run
    frozen = build_embedded_models(SD15, seed=SEED)
    plain_unet, text_only_unet = _copy_unet(frozen.unet), _copy_unet(frozen.unet)
    model = plus_model(frozen).eval()
    start_from_adapter_file(model, result["export"][0])
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    timesteps = torch.tensor([10, 700])
    text = torch.randn(2, 77, 768, generator=generator)
    hidden = torch.randn(2, 257, model.spec.encoder_width, generator=generator)
    with torch.no_grad():
        ours = model(latents, timesteps, text, hidden)
        pipe = StableDiffusionPipeline(
            vae=frozen.vae, text_encoder=frozen.text_encoders["text_encoder"], tokenizer=None, unet=plain_unet,
            scheduler=frozen.scheduler, safety_checker=None, feature_extractor=None, image_encoder=None,
            requires_safety_checker=False,
        )
        export = result["export"][0]
        pipe.load_ip_adapter(str(export.parent), subfolder="", weight_name=export.name, image_encoder_folder=None)
        assert type(plain_unet.encoder_hid_proj.image_projection_layers[0]).__name__ == "IPAdapterPlusImageProjection"
        theirs = plain_unet(latents, timesteps, encoder_hidden_states=text,
                            added_cond_kwargs={"image_embeds": [hidden[:, None]]}).sample
        text_only = text_only_unet(latents, timesteps, encoder_hidden_states=text).sample
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    assert (ours - text_only).abs().max() > 1e-3  # the image prompt does something


def test_init_adapter_plus_starts_from_the_file_and_refuses_base(tmp_path, toy_data, plus_run):
    _, result = plus_run
    exported = result["export"][0]
    # lr 0: AdamW leaves every weight where it started, so the state after step 1 holds the step-0 weights
    args = small_run_args(tmp_path / "init", toy_data, 1, **{"model.variant": "plus", "model.init_adapter": exported,
                                                             "optim.lr": 0})
    main(args)
    started = torch.load(tmp_path / "init" / "state" / "step-00000001" / "adapter.pt", weights_only=True)
    file_tensors = load_adapter(exported, base_width=None).flat_state_dict()
    assert started.keys() == file_tensors.keys()
    assert all(torch.equal(started[key], tensor.float()) for key, tensor in file_tensors.items())

    frozen = build_embedded_models(SD15, seed=SEED)
    base = export_adapter(IPAdapterModel(frozen.unet, frozen.image_encoder.embed_dim), tmp_path / "ip-adapter_sd15.safetensors", 0, "")
    with pytest.raises(ModelFileError) as refused:
        main(small_run_args(tmp_path / "wrong", toy_data, 1, **{"model.variant": "plus", "model.init_adapter": base}))
    message = str(refused.value)
    assert "\n" not in message
    assert "is an SD1.5 base adapter with 4 tokens from 32-d image embeddings" in message
    assert "expected a plus adapter (Resampler width 768, depth 4, 12 heads) with 16 tokens from 64-d hidden states" in message
    assert not (tmp_path / "wrong" / "state").exists()


class Interrupted(Exception):
    pass


def test_plus_resume_matches_the_uninterrupted_run_bitwise(tmp_path, toy_data, plus_run):
    straight_output, _ = plus_run
    reference = torch.load(straight_output / "state" / "step-00000003" / "adapter.pt", weights_only=True)

    def dies_after_step_3(step):
        if step == 3:
            raise Interrupted("killed after step 3, before its save")

    args = small_run_args(tmp_path, toy_data, 3, **{"model.variant": "plus", "sample.every": 3, "sample.steps": 2})
    with pytest.raises(Interrupted):
        main(args, extra_hooks=[dies_after_step_3])
    assert (tmp_path / "state" / "latest").read_text() == "step-00000002"
    resumed = main(args + ["--resume"])
    assert resumed["step"] == 3
    final = torch.load(tmp_path / "state" / "step-00000003" / "adapter.pt", weights_only=True)
    assert final.keys() == reference.keys()
    assert all(torch.equal(final[key], reference[key]) for key in reference)


def test_full_face_falls_out_of_the_mlp_projection(tmp_path, toy_data):
    result = main(small_run_args(tmp_path, toy_data, 2, **{"model.variant": "full-face"}))
    assert result["export"][0].name == "ip-adapter-full-face_sd15_step00000002.safetensors"
    spec = load_adapter(result["export"][0], base_width=None).spec
    assert (spec.variant, spec.num_tokens, spec.encoder_input) == ("full-face", None, "penultimate")


def test_plus_trains_from_its_cache_with_sample_grids(tmp_path, toy_data):
    from training.cache import main as cache_main

    args = small_run_args(tmp_path, toy_data, 1, **{"model.variant": "plus", "cache.dir": tmp_path / "cache",
                                                    "sample.every": 1, "sample.steps": 1})
    summary = cache_main(args)
    with safe_open(str(next(summary["folder"].glob("shard-*.safetensors"))), "pt") as handle:
        assert handle.get_slice("penultimate").get_shape() == [8, 257, 64]  # 257 x hidden width per image
    result = main(args + ["--cache.use", "require"])
    assert all(torch.isfinite(torch.tensor(result["history"])))
    assert (tmp_path / "samples" / "step-00000001.png").is_file()


def test_full_size_parameter_counts_of_the_variants():
    from diffusers import UNet2DConditionModel

    from training.base_models import config_dir

    config = UNet2DConditionModel.load_config(str(config_dir(SD15)), subfolder="unet", local_files_only=True)
    counts = {}
    with torch.device("meta"):  # shapes only: SD1.5 with ViT-H/14 (1024-d embeddings, 1280-wide hidden states)
        unet = UNet2DConditionModel.from_config(config)
        for variant in ("base", "plus", "full-face"):
            model = IPAdapterModel(unet, spec=adapter_spec(variant, None, 1024, 1280, unet))
            counts[variant] = (model.num_trainable(), sum(p.numel() for p in model.image_proj.parameters()))
    # plus: the 98 MB of the released ip-adapter-plus_sd15 in fp16
    assert counts == {"base": (22_319_616, 3_150_336), "plus": (49_087_488, 29_918_208), "full-face": (21_794_304, 2_625_024)}
