"""The FaceID LoRA in ComfyUI: our weight patches and ComfyUI's own LoRA loader (LoraLoaderModelOnly) on the
sidecar we write give the same UNet; the sidecar is found beside its adapter by name; λ = 0 without the LoRA is
the model without the adapter; one-line refusals."""

import pytest
import torch

from devtools.adapter_factory import random_faceid_adapter
from devtools.comfy_inprocess import build_sd15_model_patcher, pack_module, random_unet_inputs, sigma_at, weights_patched

WIDTH = 64
ADAPTER = "ip-adapter-faceid_sd15.bin"


@pytest.fixture(scope="module")
def model(comfy):
    return build_sd15_model_patcher(WIDTH, seed=3)


@pytest.fixture(scope="module")
def checkpoint():
    adapter_file = pack_module("ipadapter.adapter_file")
    nested = random_faceid_adapter("faceid", base_width=WIDTH, seed=4, lora_scale=0.5)
    return adapter_file.IPAdapterCheckpoint.from_state_dicts(**nested, source=ADAPTER, base_width=None)




def predict(patcher, inputs, sigma):
    with weights_patched(patcher):
        return inputs.predict(patcher, sigma)


@pytest.fixture
def lora_folder(tmp_path):
    """ComfyUI's models/loras pointed at a fresh folder for one test."""
    import folder_paths

    saved = folder_paths.folder_names_and_paths.get("loras")
    cache = getattr(folder_paths, "filename_list_cache", {})
    cache.pop("loras", None)
    folder_paths.folder_names_and_paths["loras"] = ([str(tmp_path)], {".safetensors"})
    yield tmp_path
    cache.pop("loras", None)
    if saved is not None:
        folder_paths.folder_names_and_paths["loras"] = saved


def test_our_lora_equals_comfyuis_lora_loader_on_the_sidecar(model, checkpoint, lora_folder):
    import nodes as comfy_nodes  # ComfyUI's own nodes.py

    faceid = pack_module("ipadapter.faceid")
    glue = pack_module("comfyui_glue.faceid_lora")
    lora = faceid.FaceIDLoRA.from_checkpoint(checkpoint)
    assert lora.rank == 4 and len(lora.weights) == 4 * 32  # q, k, v, out on SD1.5's 32 attention processors
    sidecar = glue.save_lora_sidecar(lora, lora_folder / glue.lora_sidecar_name(ADAPTER), dtype=torch.float32)
    assert sidecar.name == "ip-adapter-faceid_sd15_lora.safetensors"

    strength = 0.6
    ours = glue.apply_adapter_lora(model, checkpoint, strength)
    (theirs,) = comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(model, sidecar.name, strength)
    assert set(ours.patches) == set(theirs.patches) and len(ours.patches) == len(lora.weights)
    from_file = glue.apply_lora_sidecar(model, sidecar, strength)

    inputs = random_unet_inputs(model, 768, seed=7)
    sigma = sigma_at(model, 500)
    plain = inputs.predict(model, sigma)
    ours_out, theirs_out, file_out = (predict(p, inputs, sigma) for p in (ours, theirs, from_file))
    assert torch.allclose(ours_out, theirs_out, rtol=0, atol=1e-6), (ours_out - theirs_out).abs().max()
    assert torch.equal(ours_out, file_out)
    assert (ours_out - plain).norm() / plain.norm() > 1e-2  # the LoRA matters here
    assert torch.equal(inputs.predict(model, sigma), plain)  # and is off the shared model again


def test_weight_zero_without_the_lora_is_the_model_without_the_adapter(model, checkpoint):
    faceid = pack_module("ipadapter.faceid")
    glue = pack_module("comfyui_glue.faceid_lora")
    image_prompt = pack_module("ipadapter.image_prompt")
    patcher_module = pack_module("patcher")
    layer_weights = pack_module("ipadapter.weighting").layer_weights

    face = torch.nn.functional.normalize(torch.randn(2, 512, generator=torch.Generator().manual_seed(1)), dim=-1)
    images = faceid.faceid_embeds(type("Faces", (), {"embeds": face, "norms": torch.full((2,), 20.0)})())
    projection = checkpoint.build_projection()
    inputs = random_unet_inputs(model, 768, seed=8)
    sigma = sigma_at(model, 300)
    plain = inputs.predict(model, sigma)

    def with_adapter(weight, lora_strength):
        cond, uncond = image_prompt.image_tokens(checkpoint, projection, images, None, "concat")
        term = patcher_module.ImagePromptTerm.build(checkpoint, cond, uncond,
                                                    layer_weights(checkpoint.spec.architecture, weight), 1e9, 0.0)
        return patcher_module.apply_image_prompt(glue.apply_adapter_lora(model, checkpoint, lora_strength), term)

    assert glue.apply_adapter_lora(model, checkpoint, 0.0) is model  # strength 0: no patches, as LoraLoader
    assert torch.equal(predict(with_adapter(0.0, 0.0), inputs, sigma), plain)
    assert (predict(with_adapter(1.0, 0.0), inputs, sigma) - plain).norm() / plain.norm() > 1e-2
    # the LoRA alone changes the model: λ = 0 with the LoRA on is not the plain model
    assert (predict(with_adapter(0.0, 1.0), inputs, sigma) - plain).norm() / plain.norm() > 1e-2


def test_sidecar_is_found_beside_its_adapter_by_name_and_reads_back(tmp_path, checkpoint):
    faceid = pack_module("ipadapter.faceid")
    adapters, loras = tmp_path / "ipadapter", tmp_path / "loras"
    adapters.mkdir()
    loras.mkdir()
    adapter = adapters / ADAPTER
    adapter.write_bytes(b"")  # only its name matters here
    lora = faceid.FaceIDLoRA.from_checkpoint(checkpoint)
    assert faceid.find_lora_sidecar(adapter, [loras]) is None
    in_loras = faceid.save_lora_sidecar(lora, loras / "IP-Adapter-FaceID_sd15_LoRA.safetensors")  # another case
    assert faceid.find_lora_sidecar(adapter, [loras]) == in_loras
    beside = faceid.save_lora_sidecar(lora, adapters / "ip-adapter-faceid_sd15_lora.safetensors")  # fp16, released
    assert faceid.find_lora_sidecar(adapter, [loras]) == beside  # beside the adapter first

    read = faceid.load_lora_sidecar(beside)
    assert read.family is lora.family and read.rank == lora.rank
    assert set(read.kohya_state_dict()) == set(lora.kohya_state_dict())
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0.lora_down.weight" in \
        read.kohya_state_dict()
    for name, tensor in read.checkpoint_tensors().items():
        torch.testing.assert_close(tensor.float(), checkpoint.ip_adapter[name].half().float())


def assert_one_line(error, *fragments):
    message = str(error.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message


def test_lora_refusals(model, tmp_path):
    from safetensors.torch import save_file

    adapter_file = pack_module("ipadapter.adapter_file")
    faceid = pack_module("ipadapter.faceid")
    glue = pack_module("comfyui_glue.faceid_lora")

    sdxl = adapter_file.IPAdapterCheckpoint.from_state_dicts(
        **random_faceid_adapter("faceid", base_width=WIDTH, family="sdxl"), source="ip-adapter-faceid_sdxl.bin",
        base_width=None)
    with pytest.raises(ValueError) as error:
        glue.apply_adapter_lora(model, sdxl, 1.0)
    assert_one_line(error, "ip-adapter-faceid_sdxl.bin", "SDXL adapter", "the MODEL is SD1.5")

    wider = adapter_file.IPAdapterCheckpoint.from_state_dicts(
        **random_faceid_adapter("faceid", base_width=2 * WIDTH), source="wide.bin", base_width=None)
    with pytest.raises(ValueError) as error:
        glue.apply_adapter_lora(model, wider, 1.0)
    assert_one_line(error, "'wide.bin' changes down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q as [128, 128]",
                    "the MODEL's layer is [64, 64]")

    portrait = adapter_file.IPAdapterCheckpoint.from_state_dicts(
        **random_faceid_adapter("faceid-portrait", base_width=WIDTH), source="portrait.bin", base_width=None)
    with pytest.raises(ValueError) as error:
        faceid.FaceIDLoRA.from_checkpoint(portrait)
    assert_one_line(error, "'portrait.bin' (faceid-portrait) carries no LoRA")

    kohya = tmp_path / "style_lora.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 64),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(64, 4)}, str(kohya))
    with pytest.raises(ValueError) as error:
        glue.apply_lora_sidecar(model, kohya)
    assert_one_line(error, "'style_lora.safetensors' holds a LoRA of 1 layers", "not the FaceID LoRA of SD1.5")
