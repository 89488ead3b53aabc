"""The node functions inside a real ComfyUI (in-process): encoding, embeddings files, bad input."""
import pytest
import torch

from devtools.adapter_factory import random_adapter
from devtools.comfy_inprocess import build_sd15_model_patcher, pack_module, sd15_unet_config
from ipadapter.encoder import build_vision_tower

WIDTH = 64


@pytest.fixture(scope="module")
def nodes(comfy):
    return pack_module("nodes")


@pytest.fixture(scope="module")
def encoder(nodes):
    tower = build_vision_tower("ViT-H-14", width=128, layers=2, head_width=64, image_size=56, embed_dim=1024)
    return nodes.ManagedEncoder(tower)


@pytest.fixture(scope="module")
def adapter(nodes):
    checkpoint = pack_module("ipadapter.adapter_file").IPAdapterCheckpoint.from_state_dicts(
        **random_adapter("base", base_width=WIDTH), source="ip-adapter_sd15.safetensors", base_width=None)
    return nodes.LoadedAdapter(checkpoint, checkpoint.build_projection())


@pytest.fixture(scope="module")
def model(comfy):
    return build_sd15_model_patcher(WIDTH)


def one_line(error):
    message = str(error.value)
    assert "\n" not in message
    return message


def test_encode_fills_the_reference_unconditional_inputs(nodes, encoder):
    images = torch.rand(3, 40, 60, 3)
    embeds = nodes.encode_images(encoder, images, "crop")
    assert embeds.image_embeds.shape == (3, 1024) and embeds.penultimate.shape == (3, 17, 128)
    assert not embeds.uncond_image_embeds.any()  # zero embedding for base adapters
    blank = encoder.encoder.encode(encoder.encoder.uncond_pixels(1)).penultimate
    assert torch.allclose(embeds.uncond_penultimate, blank.float())  # blank image for plus / full-face
    negative = nodes.encode_images(encoder, images, "crop", negative_image=torch.rand(1, 50, 50, 3))
    assert negative.uncond_image_embeds.abs().sum() > 0
    padded = nodes.encode_images(encoder, images, "pad")
    assert not torch.allclose(padded.image_embeds, embeds.image_embeds)


def test_embeds_save_and_load_round_trip(nodes, encoder, tmp_path):
    import folder_paths

    folder_paths.set_output_directory(str(tmp_path))
    embeds = nodes.encode_images(encoder, torch.rand(2, 56, 56, 3), "crop")
    result = nodes.IPAdapterKitSaveEmbeds().save(embeds, "ref")
    saved = result["ui"]["text"][0]
    assert saved.endswith("ipadapter_embeds/ref_00001.safetensors")
    choices = nodes.IPAdapterKitLoadEmbeds.INPUT_TYPES()["required"]["embeds_file"][0]
    assert "ipadapter_embeds/ref_00001.safetensors [output]" in choices
    (loaded,) = nodes.IPAdapterKitLoadEmbeds().load("ipadapter_embeds/ref_00001.safetensors [output]")
    for name in ("image_embeds", "penultimate", "uncond_image_embeds", "uncond_penultimate"):
        assert torch.equal(getattr(loaded, name), getattr(embeds, name))
    assert loaded.encoder_name == embeds.encoder_name


def test_apply_node_patches_and_keeps_input(nodes, encoder, adapter, model):
    embeds = nodes.encode_images(encoder, torch.rand(1, 56, 56, 3), "crop")
    (patched,) = nodes.IPAdapterKitApply().apply(model, adapter, 0.8, 0.0, 1.0, "average", "style", "", embeds=embeds)
    attn2 = patched.model_options["transformer_options"]["patches_replace"]["attn2"]
    assert len(attn2) == 16
    term = attn2[("middle", 0, 0)].terms[0]
    # layers = style: SD1.5's style blocks (the first two down levels, the last up levels)
    assert [k for k in range(1, 32, 2) if term.layer_weight(k)] == [1, 3, 5, 7, *range(17, 30, 2)]
    assert term.layer_weight(19) == pytest.approx(0.8)
    assert "patches_replace" not in model.model_options["transformer_options"]


def test_bad_input_gets_one_line_errors(nodes, comfy, encoder, adapter, model):
    embeds = nodes.encode_images(encoder, torch.rand(1, 56, 56, 3), "crop")
    apply = nodes.IPAdapterKitApply().apply

    with pytest.raises(ValueError) as error:
        nodes.encode_images(encoder, torch.zeros(0, 56, 56, 3), "crop")
    assert "image batch is empty" in one_line(error)

    with pytest.raises(ValueError) as error:
        apply(model, adapter, 1.0, 0.0, 1.0, "average", "all", "", embeds=embeds, attn_mask=torch.ones(1, 1, 8, 8))
    assert "attention mask has shape [1, 1, 8, 8]" in one_line(error)

    sd2_config = {**sd15_unet_config(WIDTH), "context_dim": 1024}
    sd2 = comfy.model_patcher.ModelPatcher(
        comfy.model_base.BaseModel(comfy.supported_models.SD15(sd2_config), device=torch.device("cpu")),
        load_device=torch.device("cpu"), offload_device=torch.device("cpu"))
    with pytest.raises(ValueError) as error:
        apply(sd2, adapter, 1.0, 0.0, 1.0, "average", "all", "", embeds=embeds)
    assert "16 cross-attention layers with context width 1024; expected SD1.5 or SDXL" in one_line(error)

    full_width = build_sd15_model_patcher(32)
    with pytest.raises(ValueError) as error:
        apply(full_width, adapter, 1.0, 0.0, 1.0, "average", "all", "", embeds=embeds)
    assert "starts 32 channels wide" in one_line(error)

    checkpoint_module = pack_module("ipadapter.adapter_file")
    bigg = checkpoint_module.IPAdapterCheckpoint.from_state_dicts(
        **random_adapter("base", base_width=WIDTH, encoder_width=1280), source="ip-adapter_sd15_vit-G.safetensors", base_width=None)
    with pytest.raises(ValueError) as error:
        apply(model, nodes.LoadedAdapter(bigg, bigg.build_projection()), 1.0, 0.0, 1.0, "average", "all", "", embeds=embeds)
    assert "ip-adapter_sd15_vit-G.safetensors' expects OpenCLIP ViT-bigG/14 image embeddings of width 1280" in one_line(error)

    with pytest.raises(ValueError) as error:
        apply(model, adapter, 1.0, 0.0, 1.0, "average", "custom", "1,2", embeds=embeds)
    assert "expected 16" in one_line(error)

    with pytest.raises(ValueError) as error:
        apply(model, adapter, 1.0, 0.0, 1.0, "average", "all", "")
    assert "no embeds, no image + image_encoder and no regions" in one_line(error)

    with pytest.raises(FileNotFoundError) as error:
        nodes.load_adapter_file("not-there.safetensors")
    assert "'not-there.safetensors' is not in models/ipadapter" in one_line(error)


def test_model_folder_is_registered_with_extra_paths_kept(nodes, tmp_path):
    import folder_paths

    extra = str(tmp_path / "shared_ipadapters")
    folder_paths.folder_names_and_paths["ipadapter"] = ([extra], set())  # as extra_model_paths.yaml leaves it
    nodes.register_model_folder()
    paths, extensions = folder_paths.folder_names_and_paths["ipadapter"]
    assert paths[0] == extra and paths[1].endswith("ipadapter") and ".safetensors" in extensions and ".bin" in extensions
    (tmp_path / "shared_ipadapters").mkdir()
    (tmp_path / "shared_ipadapters" / "ip-adapter_sd15.safetensors").write_bytes(b"")
    assert "ip-adapter_sd15.safetensors" in folder_paths.get_filename_list("ipadapter")


@pytest.mark.slow
def test_comfy_clip_vision_output_gives_the_same_embeddings(nodes, comfy, vit_h_file):
    import comfy.clip_vision

    clip_vision = comfy.clip_vision.load(str(vit_h_file))  # what ComfyUI's Load CLIP Vision returns
    (from_comfy,) = nodes.IPAdapterKitEncoderFromCLIPVision().convert(clip_vision)
    ours = nodes.ManagedEncoder(pack_module("ipadapter.encoder").load_image_encoder(vit_h_file))
    image = torch.rand(2, 240, 300, 3, generator=torch.Generator().manual_seed(0))
    a = nodes.encode_images(from_comfy, image, "crop")
    b = nodes.encode_images(ours, image, "crop")
    assert torch.equal(a.image_embeds, b.image_embeds) and torch.equal(a.penultimate, b.penultimate)
    # and ComfyUI's own encoder agrees (its preprocessing rounds pixels to 1/255 and computes from fp16 weights)
    with torch.inference_mode():  # as ComfyUI runs its nodes; with autograd on, the graph outlives the test
        reference = clip_vision.encode_image(image)
    relative = (reference.image_embeds.float() - a.image_embeds).norm() / reference.image_embeds.norm()
    assert relative < 2e-2, relative
    relative = (reference.penultimate_hidden_states.float() - a.penultimate).norm() / reference.penultimate_hidden_states.norm()
    assert relative < 2e-2, relative
