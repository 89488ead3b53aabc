"""training.base_models: a family's base model from a diffusers folder or the original single file, offline (SDXL here,
the family with two text encoders and time ids; SD1.5 runs through the same code in test_training.py); detection."""
import time

import pytest
import torch
from safetensors.torch import save_file

from ipadapter.registry.families import SD15, SDXL
from training.base_models import BaseModelParts, config_dir, detect_family, load_base_model
from training.models import ModelFileError, PromptTokenizer, check_finite, family_scheduler
from training_fixtures import write_fake_single_file

UNET_PREFIX, VAE_PREFIX = SDXL.training.unet_prefix, SDXL.training.vae_prefix
CLIP_L_PREFIX, CLIP_G_PREFIX = (encoder.single_file_prefix for encoder in SDXL.training.text_encoders)


def load_sdxl(path, dtype=torch.float32):
    return load_base_model(path, SDXL, dtype)


def small_sdxl_parts(width: int = 32):
    """SDXL's layout (3 levels, transformer depths 1/2/10, 2048-d context, text_time 2816), narrow; random weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    channels = (width, 2 * width, 4 * width)
    unet = UNet2DConditionModel(  # devtools.sdxl_models.diffusers_sdxl_unet_from_comfy's config
        sample_size=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=channels, layers_per_block=2, transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=tuple(max(1, c // 64) for c in channels),
        cross_attention_dim=2048, use_linear_projection=True, norm_num_groups=32,
        addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    )
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=8,
                        sample_size=32, scaling_factor=0.13025, force_upcast=True)
    common = dict(num_hidden_layers=2, intermediate_size=64, vocab_size=1000, max_position_embeddings=77)
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=768, num_attention_heads=12, projection_dim=768,
                                                hidden_act="quick_gelu", **common))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, num_attention_heads=20,
                                                                projection_dim=1280, hidden_act="gelu", **common))
    return unet, vae, text_encoder, text_encoder_2


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sdxl-folder")
    modules = dict(zip(("unet", "vae", "text_encoder", "text_encoder_2"), small_sdxl_parts()))
    for name, module in modules.items():
        module.save_pretrained(folder / name)
    (folder / "scheduler").mkdir()  # SDXL base's own scheduler config is EulerDiscrete's
    (folder / "scheduler" / "scheduler_config.json").write_text(
        '{"_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012, '
        '"beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "prediction_type": "epsilon", '
        '"interpolation_type": "linear", "steps_offset": 1, "timestep_spacing": "leading", "use_karras_sigmas": false}')
    return folder, modules


def assert_same_weights(loaded: torch.nn.Module, saved: torch.nn.Module):
    ours, theirs = loaded.state_dict(), saved.state_dict()
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        assert torch.equal(ours[key], value), key


def test_folder_loads_every_weight(sdxl_folder):
    folder, modules = sdxl_folder
    parts = load_sdxl(folder)
    assert isinstance(parts, BaseModelParts)
    for name, module in modules.items():
        loaded = getattr(parts, name) if name in ("unet", "vae") else parts.text_encoders[name]
        assert type(loaded) is type(module)
        assert_same_weights(loaded, module)
        assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()]), name
    assert parts.text_encoders["text_encoder_2"].config.projection_dim == 1280
    assert parts.vae.config.scaling_factor == 0.13025
    assert parts.tokenizer_dirs == {"text_encoder": None, "text_encoder_2": None}
    assert parts.scheduler_dir == folder / "scheduler"
    scheduler = family_scheduler(SDXL, folder)
    assert type(scheduler).__name__ == "DDPMScheduler"
    assert scheduler.config.num_train_timesteps == 1000 and scheduler.config.prediction_type == "epsilon"
    # the text encoders run: the pooled bigG embedding is what SDXL's added conditioning takes
    ids = torch.tensor([[49406 % 1000, 5, 6, 999] + [0] * 73])
    assert parts.text_encoders["text_encoder_2"](ids).text_embeds.shape == (1, 1280)


def test_folder_in_half_precision(sdxl_folder):
    folder, modules = sdxl_folder
    parts = load_sdxl(folder, dtype=torch.float16)
    for name, module in {"unet": parts.unet, "vae": parts.vae, **parts.text_encoders}.items():
        assert {p.dtype for p in module.parameters()} == {torch.float16}, name
    weight = parts.unet.conv_in.weight
    assert torch.equal(weight, modules["unet"].conv_in.weight.to(torch.float16))


def test_folder_with_bin_and_sharded_weights(sdxl_folder, tmp_path):
    """A UNet saved as diffusion_pytorch_model.bin (read through torch.load(mmap=True, weights_only=True)) and a VAE
    in safetensors shards with an index."""
    folder, modules = sdxl_folder
    copy = tmp_path / "bin"
    for name in ("unet", "text_encoder", "text_encoder_2"):
        (copy / name).mkdir(parents=True)
        for item in (folder / name).iterdir():
            if not (name == "unet" and item.suffix == ".safetensors"):
                (copy / name / item.name).write_bytes(item.read_bytes())
    torch.save(modules["unet"].state_dict(), str(copy / "unet" / "diffusion_pytorch_model.bin"))
    modules["vae"].save_pretrained(copy / "vae", max_shard_size="20KB")
    assert (copy / "vae" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    parts = load_sdxl(copy)
    assert_same_weights(parts.unet, modules["unet"])
    assert_same_weights(parts.vae, modules["vae"])


def test_folder_errors_are_one_line(sdxl_folder, tmp_path):
    folder, _ = sdxl_folder
    partial = tmp_path / "no-bigg"
    partial.mkdir()
    for name in ("unet", "vae", "text_encoder"):
        (partial / name).symlink_to(folder / name, target_is_directory=True)
    with pytest.raises(ModelFileError) as error:
        load_sdxl(partial)
    message = str(error.value)
    assert "\n" not in message and "has no text_encoder_2/" in message and "expected a diffusers SDXL folder" in message

    sd15 = tmp_path / "sd15"
    (sd15 / "unet").mkdir(parents=True)
    (sd15 / "text_encoder").mkdir()
    (sd15 / "unet" / "config.json").write_text('{"_class_name": "UNet2DConditionModel", "cross_attention_dim": 768}')
    with pytest.raises(ModelFileError, match=r"it looks like an SD1\.5 model folder"):
        load_sdxl(sd15)

    no_weights = tmp_path / "no-weights"
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        target = no_weights / name
        target.mkdir(parents=True)
        for item in (folder / name).iterdir():
            if item.name == "config.json":
                (target / item.name).write_text(item.read_text())
    with pytest.raises(ModelFileError, match=r"unet/ has no weights; expected diffusion_pytorch_model\.safetensors"):
        load_sdxl(no_weights)

    missing_tensor = tmp_path / "missing-tensor"
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        (missing_tensor / name).mkdir(parents=True)
        for item in (folder / name).iterdir():
            (missing_tensor / name / item.name).write_bytes(item.read_bytes())
    from safetensors.torch import load_file
    weights = missing_tensor / "vae" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    del state["decoder.conv_out.weight"]
    save_file(state, str(weights))
    with pytest.raises(ModelFileError) as error:
        load_sdxl(missing_tensor)
    assert "\n" not in str(error.value) and "lacks 1 weights (e.g. decoder.conv_out.weight)" in str(error.value)

    with pytest.raises(ModelFileError, match="does not exist"):
        load_sdxl(tmp_path / "nowhere")


def fake_single_file(path, prefixes):
    save_file({f"{prefix}weight": torch.zeros(2) for prefix in prefixes}, str(path))
    return path


SDXL_KEYS = (UNET_PREFIX + "input_blocks.0.0.", VAE_PREFIX + "encoder.conv_in.",
             CLIP_L_PREFIX + "text_model.final_layer_norm.", CLIP_G_PREFIX + "ln_final.")
SD15_KEYS = (UNET_PREFIX + "input_blocks.0.0.", VAE_PREFIX + "encoder.conv_in.",
             "cond_stage_model.transformer.text_model.final_layer_norm.")


def test_detect_family(sdxl_folder, tmp_path):
    folder, _ = sdxl_folder
    assert detect_family(folder) is SDXL and detect_family(str(folder)) is SDXL
    assert detect_family(fake_single_file(tmp_path / "xl.safetensors", SDXL_KEYS)) is SDXL
    assert detect_family(fake_single_file(tmp_path / "v15.safetensors", SD15_KEYS)) is SD15
    assert detect_family(write_fake_single_file(tmp_path / "from-registry.safetensors", SD15)) is SD15
    assert detect_family(write_fake_single_file(tmp_path / "from-registry-xl.safetensors", SDXL)) is SDXL
    ckpt = tmp_path / "v15.ckpt"
    torch.save({"state_dict": {f"{p}weight": torch.zeros(2) for p in SD15_KEYS}}, str(ckpt))
    assert detect_family(ckpt) is SD15
    refiner = fake_single_file(tmp_path / "refiner.safetensors", ("conditioner.embedders.0.model.ln_final.",))
    other = fake_single_file(tmp_path / "other.safetensors", ("encoder.",))
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    for path, message in ((refiner, "it looks like an SDXL refiner checkpoint"), (other, "found encoder.weight"),
                          (tmp_path / "broken.safetensors", "is not a readable .safetensors file"),
                          (tmp_path / "nowhere.safetensors", "does not exist; expected a diffusers model folder")):
        with pytest.raises(ModelFileError) as error:
            detect_family(path)
        assert "\n" not in str(error.value) and message in str(error.value), str(error.value)

    sd15 = tmp_path / "sd15-folder"
    for name in ("unet", "vae", "text_encoder", "tokenizer"):
        (sd15 / name).mkdir(parents=True)
    assert detect_family(sd15) is SD15
    (sd15 / "unet" / "config.json").write_text('{"cross_attention_dim": 768}')
    assert detect_family(sd15) is SD15
    (sd15 / "unet" / "config.json").write_text('{"cross_attention_dim": 1024}')  # SD2
    with pytest.raises(ModelFileError, match="it looks like an SD2.x model folder"):
        detect_family(sd15)


def test_single_file_refuses_other_families(tmp_path):
    with pytest.raises(ModelFileError) as error:
        load_sdxl(fake_single_file(tmp_path / "v1-5.safetensors", SD15_KEYS))
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("'v1-5.safetensors' is not an SDXL checkpoint (no OpenCLIP ViT-bigG/14 text encoder: "
                              "conditioner.embedders.1.model.* keys; it looks like an SD1.5 checkpoint)"), message
    with pytest.raises(ModelFileError, match="SDXL refiner checkpoint"):
        load_sdxl(fake_single_file(tmp_path / "refiner.safetensors",
                                   (UNET_PREFIX, VAE_PREFIX, "conditioner.embedders.0.model.ln_final.")))
    with pytest.raises(ModelFileError, match=r"no VAE: first_stage_model\.\* keys; found"):
        load_sdxl(fake_single_file(tmp_path / "no-vae.safetensors", (SDXL_KEYS[0], *SDXL_KEYS[2:])))
    (tmp_path / "truncated.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    with pytest.raises(ModelFileError, match="is not a readable .safetensors file"):
        load_sdxl(tmp_path / "truncated.safetensors")
    with pytest.raises(ModelFileError, match="does not exist"):
        load_sdxl(tmp_path / "nowhere.safetensors")


def test_shipped_configs():
    from diffusers import AutoencoderKL, UNet2DConditionModel

    for family in (SD15, SDXL):  # the shipped configs agree with the registry
        unet = UNet2DConditionModel.load_config(str(config_dir(family)), subfolder="unet", local_files_only=True)
        assert unet["cross_attention_dim"] == family.context_dim == family.training.context_width
        vae = AutoencoderKL.load_config(str(config_dir(family)), subfolder="vae", local_files_only=True)
        assert vae["scaling_factor"] == family.training.vae_scaling_factor
    unet = UNet2DConditionModel.load_config(str(config_dir(SDXL)), subfolder="unet", local_files_only=True)
    assert unet["cross_attention_dim"] == 2048 and unet["transformer_layers_per_block"] == [1, 2, 10]
    vae = AutoencoderKL.load_config(str(config_dir(SDXL)), subfolder="vae", local_files_only=True)
    assert vae["scaling_factor"] == 0.13025 and vae["force_upcast"] is True
    scheduler = family_scheduler(SDXL)
    assert (scheduler.config.beta_start, scheduler.config.beta_end, scheduler.config.beta_schedule) == (
        0.00085, 0.012, "scaled_linear")
    assert scheduler.config.num_train_timesteps == 1000 and scheduler.config.prediction_type == "epsilon"


# --- full size ---------------------------------------------------------------------------------------------------


def file_tensor(path, key):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return handle.get_tensor(key)


@pytest.mark.slow
def test_full_size_single_file():
    """The random full-size SDXL base file (fp16, 6.9 GB) through load_base_model, in fp16 (6.9 GB of memory)."""
    from devtools.comfyui_harness import sdxl_checkpoint_path

    path = sdxl_checkpoint_path()
    start = time.perf_counter()
    parts = load_sdxl(path, dtype=torch.float16)
    print(f"load_base_model: {time.perf_counter() - start:.1f} s")

    counts = {}
    for name, module in {"unet": parts.unet, "vae": parts.vae, **parts.text_encoders}.items():
        check_finite(module, name)
        assert not any(t.is_meta for t in [*module.parameters(), *module.buffers()]), name
        assert {p.dtype for p in module.parameters()} == {torch.float16}, name
        counts[name] = sum(p.numel() for p in module.parameters())
    assert counts["text_encoder_2"] > 690e6 and counts["unet"] > 2.5e9, counts
    assert parts.text_encoders["text_encoder_2"].config.projection_dim == 1280 and parts.vae.config.scaling_factor == 0.13025

    unet, vae = parts.unet.state_dict(), parts.vae.state_dict()
    clip_l, clip_g = parts.text_encoders["text_encoder"].state_dict(), parts.text_encoders["text_encoder_2"].state_dict()
    clip_l_prefix = "text_model." if any(k.startswith("text_model.") for k in clip_l) else ""
    same = {  # loaded tensor: the file's key (and how the original layout stores it)
        "unet conv_in": (unet["conv_in.weight"], UNET_PREFIX + "input_blocks.0.0.weight", None),
        "unet attn2 to_k": (unet["down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k.weight"],
                            UNET_PREFIX + "input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight", None),
        "unet mid ff": (unet["mid_block.attentions.0.transformer_blocks.9.ff.net.2.weight"],
                        UNET_PREFIX + "middle_block.1.transformer_blocks.9.ff.net.2.weight", None),
        "unet added cond": (unet["add_embedding.linear_1.weight"], UNET_PREFIX + "label_emb.0.0.weight", None),
        "unet up attn": (unet["up_blocks.0.attentions.2.transformer_blocks.9.attn1.to_out.0.weight"],
                         UNET_PREFIX + "output_blocks.2.1.transformer_blocks.9.attn1.to_out.0.weight", None),
        "unet conv_out": (unet["conv_out.weight"], UNET_PREFIX + "out.2.weight", None),
        "vae attention q": (vae["encoder.mid_block.attentions.0.to_q.weight"],
                            VAE_PREFIX + "encoder.mid.attn_1.q.weight", lambda t: t[:, :, 0, 0]),
        "vae decoder up": (vae["decoder.up_blocks.0.resnets.0.conv1.weight"],
                           VAE_PREFIX + "decoder.up.3.block.0.conv1.weight", None),
        "vae quant": (vae["quant_conv.weight"], VAE_PREFIX + "quant_conv.weight", None),
        "clip-l fc2": (clip_l[clip_l_prefix + "encoder.layers.11.mlp.fc2.weight"],
                       CLIP_L_PREFIX + "text_model.encoder.layers.11.mlp.fc2.weight", None),
        "clip-l tokens": (clip_l[clip_l_prefix + "embeddings.token_embedding.weight"],
                          CLIP_L_PREFIX + "text_model.embeddings.token_embedding.weight", None),
        "bigG v": (clip_g["text_model.encoder.layers.31.self_attn.v_proj.weight"],
                   CLIP_G_PREFIX + "transformer.resblocks.31.attn.in_proj_weight", lambda t: t[2560:]),
        "bigG q bias": (clip_g["text_model.encoder.layers.0.self_attn.q_proj.bias"],
                        CLIP_G_PREFIX + "transformer.resblocks.0.attn.in_proj_bias", lambda t: t[:1280]),
        "bigG fc1": (clip_g["text_model.encoder.layers.7.mlp.fc1.weight"],
                     CLIP_G_PREFIX + "transformer.resblocks.7.mlp.c_fc.weight", None),
        "bigG positions": (clip_g["text_model.embeddings.position_embedding.weight"],
                           CLIP_G_PREFIX + "positional_embedding", None),
        "bigG final norm": (clip_g["text_model.final_layer_norm.weight"], CLIP_G_PREFIX + "ln_final.weight", None),
        "bigG projection": (clip_g["text_projection.weight"], CLIP_G_PREFIX + "text_projection", lambda t: t.T),
    }
    for what, (loaded, key, layout) in same.items():
        expected = file_tensor(path, key)
        expected = layout(expected) if layout else expected
        assert torch.equal(loaded, expected), what
    del unet, vae, clip_l, clip_g

    parts.unet = parts.vae = None  # 5 GB less before running the text encoders
    ids = PromptTokenizer()(["a photo of a cat", "a painting of a dog"])
    with torch.no_grad():
        output = parts.text_encoders["text_encoder_2"](ids, output_hidden_states=True)
        pooled, penultimate = output.text_embeds.float(), output.hidden_states[-2].float()
        clip_l_states = parts.text_encoders["text_encoder"](ids, output_hidden_states=True).hidden_states[-2].float()
    assert pooled.shape == (2, 1280) and penultimate.shape == (2, 77, 1280) and clip_l_states.shape == (2, 77, 768)
    for tensor in (pooled, penultimate, clip_l_states):
        assert torch.isfinite(tensor).all() and tensor.std() > 1e-3
    assert not torch.allclose(pooled[0], pooled[1]), "the pooled bigG embedding does not depend on the prompt"
