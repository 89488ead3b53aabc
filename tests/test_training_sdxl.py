"""SDXL training (the authors' tutorial_train_sdxl.py) on the embedded scaled-down SDXL: the added conditioning,
exports of base (ViT-H) and plus detected as SDXL and loaded by diffusers, init_adapter across families."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from ipadapter.registry.families import SD15, SDXL
from ipadapter.adapter_file import load_adapter
from training.adapter import IPAdapterModel, start_from_adapter_file
from training.config import ConfigError
from training.run_files import export_adapter
from training.data import crop_rng, image_tensors, write_toy_dataset
from training.models import ModelFileError, build_embedded_models, seeded
from training.run import main
from training.variants import adapter_spec

from test_training import _copy_unet, small_run_args
from training_fixtures import write_fake_single_file, write_model_files

SEED = 42


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory) -> Path:
    return write_toy_dataset(tmp_path_factory.mktemp("toy"), count=8, seed=1)


@pytest.fixture(scope="module", params=["base", "plus"])
def sdxl_run(request, tmp_path_factory, toy_data):
    output = tmp_path_factory.mktemp(f"sdxl-{request.param}")
    args = {"model.family": "sdxl", "model.variant": request.param, "sample.every": 2, "sample.steps": 1}
    return request.param, output, main(small_run_args(output, toy_data, 2, **args))


def sdxl_model(frozen, variant: str) -> IPAdapterModel:
    encoder = frozen.image_encoder
    with seeded(SEED):
        return IPAdapterModel(frozen.unet, spec=adapter_spec(variant, None, encoder.embed_dim, encoder.hidden_width, frozen.unet))


def test_time_ids_record_the_original_size_and_the_crop_as_the_authors_script(tmp_path):
    image = Image.new("RGB", (150, 100))  # width 150, height 100 -> resized to 96 x 64 at resolution 64
    center = image_tensors(image, 64)
    assert center["original_size"].tolist() == [100, 150]  # (height, width) of the file
    assert center["crop_top_left"].tolist() == [0, (96 - 64) // 2]
    lefts = {image_tensors(image, 64, crop_rng(True, 0, epoch, 3))["crop_top_left"][1].item() for epoch in range(12)}
    assert len(lefts) > 3 and all(0 <= left <= 32 for left in lefts)  # random crops cover the resized image
    assert image_tensors(image, 64, crop_rng(True, 0, 5, 3))["crop_top_left"].tolist() == \
        image_tensors(image, 64, crop_rng(True, 0, 5, 3))["crop_top_left"].tolist()  # one crop per (seed, epoch, sample)

    frozen = build_embedded_models(SDXL)
    pooled = torch.randn(2, 1280)
    added = frozen.added_conditioning(pooled, torch.tensor([[100, 150], [64, 64]]), torch.tensor([[0, 16], [0, 0]]), 64)
    assert added["text_embeds"] is pooled
    assert added["time_ids"].tolist() == [[100, 150, 0, 16, 64, 64], [64, 64, 0, 0, 64, 64]]
    assert build_embedded_models(SD15).added_conditioning(None, None, None, 64) is None  # SD1.5 has none


def test_sdxl_text_condition_is_both_encoders_penultimate_states_and_bigg_pooled():
    frozen = build_embedded_models(SDXL)
    ids = frozen.tokenize(["a red circle", ""])
    assert ids.shape == (2, 2, 77)
    assert ids[1, 0, 2].item() == 49407 and ids[1, 1, 2].item() == 0  # CLIP-L pads with the end token, bigG with 0
    context, pooled = frozen.encode_text(ids)
    with torch.no_grad():
        first = frozen.text_encoders["text_encoder"](ids[:, 0], output_hidden_states=True).hidden_states[-2]
        second = frozen.text_encoders["text_encoder_2"](ids[:, 1], output_hidden_states=True)
    assert context.shape == (2, 77, 2048) and pooled.shape == (2, 1280)
    assert torch.equal(context[..., :768], first) and torch.equal(context[..., 768:], second.hidden_states[-2])
    assert torch.equal(pooled, second.text_embeds)


def test_sdxl_run_exports_an_sdxl_adapter_of_its_variant(sdxl_run):
    variant, output, result = sdxl_run
    assert all(torch.isfinite(torch.tensor(result["history"])))
    prefix = "ip-adapter" if variant == "base" else "ip-adapter-plus"
    safetensors_path, bin_path = result["export"]
    assert safetensors_path.name == f"{prefix}_sdxl_vit-h_step00000002.safetensors"  # a ViT-H-layout encoder
    spec = load_adapter(safetensors_path, base_width=None).spec
    assert (spec.family, spec.variant, spec.cross_attention_dim) == ("SDXL", variant, 2048)
    assert load_adapter(bin_path, base_width=None).spec == spec
    if variant == "plus":
        assert spec.resampler == {"dim": 1280, "depth": 4, "dim_head": 64, "heads": 20, "ff_mult": 4}
        assert spec.num_tokens == 16
    with safe_open(str(safetensors_path), "pt") as handle:
        assert handle.metadata()["format"] == "IP-Adapter SDXL (official layout)"
    assert (output / "samples" / "step-00000002.png").is_file()


def test_sdxl_export_loads_in_diffusers_sdxl_with_the_same_outputs(sdxl_run):
    from diffusers import StableDiffusionXLPipeline

    variant, _, result = sdxl_run
    frozen = build_embedded_models(SDXL, seed=SEED)
    plain_unet, text_only_unet = _copy_unet(frozen.unet), _copy_unet(frozen.unet)
    model = sdxl_model(frozen, variant).eval()
    start_from_adapter_file(model, result["export"][0])
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    timesteps = torch.tensor([10, 700])
    text = torch.randn(2, 77, 2048, generator=generator)
    added = {"text_embeds": torch.randn(2, 1280, generator=generator),
             "time_ids": torch.tensor([[100.0, 150, 0, 16, 64, 64], [64, 64, 0, 0, 64, 64]])}
    encoder = frozen.image_encoder
    features = torch.randn(2, encoder.embed_dim, generator=generator) if variant == "base" else \
        torch.randn(2, 257, encoder.hidden_width, generator=generator)
    with torch.no_grad():
        ours = model(latents, timesteps, text, features, added_cond=added)
        pipe = StableDiffusionXLPipeline(
            vae=frozen.vae, text_encoder=frozen.text_encoders["text_encoder"], text_encoder_2=frozen.text_encoders["text_encoder_2"], tokenizer=None,
            tokenizer_2=None, unet=plain_unet, scheduler=frozen.scheduler, image_encoder=None, feature_extractor=None,
        )
        export = result["export"][0]
        pipe.load_ip_adapter(str(export.parent), subfolder="", weight_name=export.name, image_encoder_folder=None)
        theirs = plain_unet(latents, timesteps, encoder_hidden_states=text,
                            added_cond_kwargs={**added, "image_embeds": [features[:, None]]}).sample
        text_only = text_only_unet(latents, timesteps, encoder_hidden_states=text, added_cond_kwargs=added).sample
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    assert (ours - text_only).abs().max() > 1e-3  # the image prompt does something


def test_init_adapter_across_families_is_refused_and_an_sdxl_file_is_the_start(tmp_path, toy_data, sdxl_run):
    variant, _, result = sdxl_run
    exported = result["export"][0]
    args = {"model.family": "sdxl", "model.variant": variant, "model.init_adapter": exported, "optim.lr": 0}
    main(small_run_args(tmp_path / "init", toy_data, 1, **args))
    started = torch.load(tmp_path / "init" / "state" / "step-00000001" / "adapter.pt", weights_only=True)
    file_tensors = load_adapter(exported, base_width=None).flat_state_dict()
    assert started.keys() == file_tensors.keys()
    assert all(torch.equal(started[key], tensor.float()) for key, tensor in file_tensors.items())

    with pytest.raises(ModelFileError) as refused:  # an SDXL file for an SD1.5 run
        main(small_run_args(tmp_path / "wrong", toy_data, 1, **{"model.variant": variant, "model.init_adapter": exported}))
    assert "\n" not in str(refused.value) and "SDXL" in str(refused.value) and "SD1.5" in str(refused.value)
    frozen = build_embedded_models(SD15, seed=SEED)
    sd15_file = export_adapter(sdxl_model(frozen, variant), tmp_path / f"{variant}_sd15.safetensors", 0, "")
    with pytest.raises(ModelFileError) as refused:  # and the reverse
        main(small_run_args(tmp_path / "wrong2", toy_data, 1, **{**args, "model.init_adapter": sd15_file}))
    assert "\n" not in str(refused.value) and "SD1.5" in str(refused.value) and "SDXL" in str(refused.value)
    assert not (tmp_path / "wrong").exists() or not (tmp_path / "wrong" / "state").exists()


def test_full_size_sdxl_parameter_counts_match_the_released_files():
    from diffusers import UNet2DConditionModel

    from training.base_models import config_dir

    config = UNet2DConditionModel.load_config(str(config_dir(SDXL)), subfolder="unet", local_files_only=True)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
        counts = {(variant, embed): IPAdapterModel(unet, spec=adapter_spec(variant, None, embed, 1280, unet)).num_trainable()
                  for variant, embed in (("base", 1280), ("base", 1024), ("plus", 1024))}
    layers = 2 * 2048 * (10 * 640 + 60 * 1280)  # to_k_ip + to_v_ip of 70 layers: 10 of width 640, 60 of 1280
    assert counts[("base", 1280)] == layers + 1280 * 4 * 2048 + 4 * 2048 + 2 * 2048  # ip-adapter_sdxl
    assert counts[("base", 1024)] == layers + 1024 * 4 * 2048 + 4 * 2048 + 2 * 2048  # ip-adapter_sdxl_vit-h: 698 MB fp16
    assert counts[("plus", 1024)] > layers  # ip-adapter-plus_sdxl_vit-h: + its Resampler


def test_an_sdxl_model_folder_is_detected_and_trains(tmp_path, toy_data):
    folder, encoder, _ = write_model_files(tmp_path, seed=3, family="sdxl")

    result = main(small_run_args(tmp_path / "out", toy_data, 1, **{"model.base": folder, "model.image_encoder": encoder,
                                                                     "model.encoder_embed_dim": 32}))
    assert result["export"][0].name == "ip-adapter_sdxl_vit-h_step00000001.safetensors"
    assert load_adapter(result["export"][0], base_width=None).spec.family == "SDXL"
    config_text = (tmp_path / "out" / "config.yaml").read_text()
    assert "family: sdxl" in config_text and "resolution: 64" in config_text

    with pytest.raises(ConfigError) as refused:  # a family named beside the base model must be the model's
        main(small_run_args(tmp_path / "wrong", toy_data, 1, **{"model.base": folder, "model.image_encoder": encoder,
                                                                  "model.family": "sd15"}))
    assert str(refused.value) == ("model.family = sd15, but model.base 'sdxl' is an SDXL model; "
                                  "expected model.family sdxl (or leave it out)")

    # the cache pass never reads the UNet: it works with the UNet's weights damaged, which training refuses
    from training.cache import main as cache_main

    weights = next((folder / "unet").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])
    args = small_run_args(tmp_path / "cached", toy_data, 1, **{"model.base": folder, "model.image_encoder": encoder,
                                                                "model.encoder_embed_dim": 32})
    assert cache_main(args)["complete"]
    with pytest.raises(ModelFileError, match="is not a readable .safetensors file"):
        main(args)


def test_sdxl_resume_matches_the_uninterrupted_run_bitwise(tmp_path, toy_data):
    """The time ids ride with the data position: a resumed SDXL run continues exactly (base; plus: test_training_plus)."""
    args = {"model.family": "sdxl", "data.crop": "random"}  # random crops: drawn again identically after resuming
    main(small_run_args(tmp_path / "straight", toy_data, 3, **args))
    reference = torch.load(tmp_path / "straight" / "state" / "step-00000003" / "adapter.pt", weights_only=True)

    class Interrupted(Exception):
        pass

    def dies_after_step_3(step):
        if step == 3:
            raise Interrupted("killed after step 3, before its save")

    resumed_args = small_run_args(tmp_path / "resumed", toy_data, 3, **args)
    with pytest.raises(Interrupted):
        main(resumed_args, extra_hooks=[dies_after_step_3])
    assert main(resumed_args + ["--resume"])["step"] == 3
    final = torch.load(tmp_path / "resumed" / "state" / "step-00000003" / "adapter.pt", weights_only=True)
    assert final.keys() == reference.keys() and all(torch.equal(final[k], reference[k]) for k in reference)


def test_the_base_model_gives_the_family_and_its_defaults_and_bad_combinations_are_one_line_errors(tmp_path, toy_data):
    from training.cache import CacheError, main as cache_main
    from training.config import load_config

    xl = write_fake_single_file(tmp_path / "xl.safetensors", SDXL)
    v15 = write_fake_single_file(tmp_path / "v1-5.safetensors", SD15)
    config, _ = load_config(["--model.base", str(xl), "--model.image_encoder", "vit.safetensors"])
    assert (config.model.family, config.family, config.data.resolution, config.base_model) == \
        ("sdxl", SDXL, 1024, str(xl))
    assert load_config(["--model.base", str(v15), "--model.image_encoder", "b"])[0].family is SD15
    for bad, message in (
        (["--model.sd15", str(v15), "--model.image_encoder", "c"],
         "option 'model.sd15' in the command line is now model.base \\(the family is read from the model's files\\)"),
        (["--model.family", "sd15", "--model.base", str(xl), "--model.image_encoder", "b"],
         "model.family = sd15, but model.base 'xl.safetensors' is an SDXL model; expected model.family sdxl"),
        (["--model.base", str(xl)], "model.base is set but model.image_encoder is not"),
        (["--data.crop", "diagonal"], "data.crop = 'diagonal'; expected one of center, random"),
        (["--model.family", "sd3"], "model.family = 'sd3'; expected one of sd15, sdxl"),
        (["--model.family", "null"], "model.family is not set; expected one of sd15, sdxl for the embedded run"),
    ):
        with pytest.raises(ConfigError, match=message):
            load_config(bad)
    with pytest.raises(ModelFileError, match="base model '.*nowhere' \\(model.base\\) does not exist"):
        load_config(["--model.base", str(tmp_path / "nowhere"), "--model.image_encoder", "b"])
    args = small_run_args(tmp_path, toy_data, 1, **{"model.family": "sdxl", "data.crop": "random"})
    with pytest.raises(CacheError, match="data.crop is random, and a cache holds one crop per image"):
        cache_main(args)
    with pytest.raises(CacheError, match="random crops are encoded every step \\(cache.use is require\\)"):
        main(args + ["--cache.use", "require"])
