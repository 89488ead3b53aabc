"""The unified loader's file search: the names users have for the released files."""
import pytest

from devtools.comfy_inprocess import pack_module
from ipadapter.registry.families import SD15, SDXL

# loaded as ComfyUI loads it, inside the pack: the glue imports the core relatively
preset_files = pack_module("comfyui_glue.model_files").preset_files

ADAPTERS = ["ip-adapter_sd15.safetensors", "ip-adapter_sd15_light_v11.bin", "IP-Adapter-Plus_SD15.safetensors",
            "ip-adapter-plus-face_sd15.safetensors", "sub/ip-adapter-full-face_sd15.safetensors",
            "ip-adapter_sd15_vit-G.safetensors", "ip-adapter_sdxl.safetensors", "ip-adapter_sdxl_vit-h.safetensors",
            "ip-adapter-plus_sdxl_vit-h.bin", "ip-adapter-plus-face_sdxl_vit-h.safetensors", "other.safetensors"]
ENCODERS = ["models/image_encoder/model.safetensors", "sdxl_models/image_encoder/model.safetensors",
            "clip_l.safetensors"]


def find(family, preset, adapters=ADAPTERS, encoders=ENCODERS):
    return preset_files(family, preset, adapters, encoders, ["/m/ipadapter"], ["/m/clip_vision"])


@pytest.mark.parametrize("family, preset, adapter, encoder", [
    (SD15, "standard", "ip-adapter_sd15.safetensors", "models/image_encoder/model.safetensors"),
    (SD15, "light", "ip-adapter_sd15_light_v11.bin", "models/image_encoder/model.safetensors"),
    (SD15, "plus", "IP-Adapter-Plus_SD15.safetensors", "models/image_encoder/model.safetensors"),
    (SD15, "full-face", "sub/ip-adapter-full-face_sd15.safetensors", "models/image_encoder/model.safetensors"),
    (SD15, "vit-bigg", "ip-adapter_sd15_vit-G.safetensors", "sdxl_models/image_encoder/model.safetensors"),
    (SDXL, "standard", "ip-adapter_sdxl_vit-h.safetensors", "models/image_encoder/model.safetensors"),
    (SDXL, "vit-bigg", "ip-adapter_sdxl.safetensors", "sdxl_models/image_encoder/model.safetensors"),
    (SDXL, "plus-face", "ip-adapter-plus-face_sdxl_vit-h.safetensors", "models/image_encoder/model.safetensors"),
])
def test_presets_find_the_released_names(family, preset, adapter, encoder):
    found = find(family, preset)
    assert (found.adapter, found.encoder) == (adapter, encoder)


def test_encoder_file_names_of_the_hub_release():
    found = find(SDXL, "vit-bigg", encoders=["CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors",
                                             "CLIP-ViT-bigG-14-laion2B-39B-b160k.safetensors"])
    assert found.encoder == "CLIP-ViT-bigG-14-laion2B-39B-b160k.safetensors"
    assert find(SD15, "plus", encoders=["CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"]).encoder.startswith("CLIP-ViT-H")


def test_missing_files_and_sd15_only_presets_are_one_line_errors():
    with pytest.raises(FileNotFoundError) as error:
        find(SDXL, "plus", adapters=["ip-adapter_sd15.safetensors"])
    message = str(error.value)
    assert "\n" not in message and "ip-adapter-plus_sdxl_vit-h.safetensors/.bin" in message and "/m/ipadapter" in message
    with pytest.raises(FileNotFoundError, match="no OpenCLIP ViT-bigG/14 image encoder found .* in /m/clip_vision"):
        find(SDXL, "vit-bigg", encoders=["models/image_encoder/model.safetensors"])
    with pytest.raises(ValueError, match="preset 'full-face' has no SDXL adapter; expected one of standard, vit-bigg, plus, plus-face"):
        find(SDXL, "full-face")


def test_dit_presets_list_every_file_of_their_names_later_versions_first():
    from ipadapter.registry.families import FLUX, SD35

    adapters = ["xlabs/flux-ip-adapter/ip_adapter.safetensors", "xlabs/flux-ip-adapter-v2/ip_adapter.safetensors",
                "instantx/FLUX.1-dev-IP-Adapter/ip-adapter.bin", "instantx/SD3.5-Large-IP-Adapter/ip-adapter.bin"]
    encoders = ["clip_vision_l.safetensors", "sigclip_vision_patch14_384.safetensors"]
    xlabs = find(FLUX, "flux-xlabs", adapters, encoders)
    assert xlabs.adapters == ("xlabs/flux-ip-adapter-v2/ip_adapter.safetensors",
                              "xlabs/flux-ip-adapter/ip_adapter.safetensors")
    assert xlabs.encoder == "clip_vision_l.safetensors"
    instantx = find(FLUX, "flux-instantx", adapters, encoders)
    # the folder names it first; SD3.5's file of the same name stays a candidate, which its tensors then refuse
    assert instantx.adapters[0] == "instantx/FLUX.1-dev-IP-Adapter/ip-adapter.bin"
    assert "instantx/SD3.5-Large-IP-Adapter/ip-adapter.bin" in instantx.adapters
    assert instantx.encoder == "sigclip_vision_patch14_384.safetensors"
    assert find(SD35, "sd35-instantx", adapters, encoders).adapters[0] == "instantx/SD3.5-Large-IP-Adapter/ip-adapter.bin"
    with pytest.raises(ValueError, match="preset 'plus' has no Flux.1 adapter; expected one of flux-xlabs, flux-instantx"):
        find(FLUX, "plus", adapters, encoders)
