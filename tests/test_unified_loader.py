"""The unified loader inside a real ComfyUI: files found by what they hold, pair checked, cached across queues."""
import pytest
import torch
from safetensors.torch import save_file

from devtools.adapter_factory import random_adapter
from ipadapter.encoder import build_vision_tower
from test_nodes import WIDTH, model, nodes  # noqa: F401  (module fixtures)


@pytest.fixture
def model_folders(tmp_path, nodes):
    import folder_paths

    saved = {name: folder_paths.folder_names_and_paths.get(name) for name in ("ipadapter", "clip_vision")}
    cache = getattr(folder_paths, "filename_list_cache", {})  # ComfyUI caches each folder's listing
    for name in saved:
        cache.pop(name, None)
        (tmp_path / name).mkdir()
        folder_paths.folder_names_and_paths[name] = ([str(tmp_path / name)], {".safetensors", ".bin"})
    yield tmp_path
    for name, value in saved.items():
        cache.pop(name, None)
        if value is not None:
            folder_paths.folder_names_and_paths[name] = value


def write_adapter(path, **kwargs):
    flat = {f"{group}.{k}": v for group, tensors in random_adapter(**kwargs).items() for k, v in tensors.items()}
    save_file(flat, str(path))


def write_encoder(path, embed_dim):
    tower = build_vision_tower("ViT-H-14", width=128, layers=2, head_width=64, image_size=56, embed_dim=embed_dim)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tower.visual.state_dict().items()}, str(path))


def test_unified_loader_finds_checks_and_caches(nodes, model, model_folders):
    write_adapter(model_folders / "ipadapter" / "ip-adapter-plus_sd15.safetensors", variant="plus", base_width=WIDTH,
                  encoder_width=128)
    write_adapter(model_folders / "ipadapter" / "ip-adapter_sd15.safetensors", variant="base", base_width=WIDTH)
    write_encoder(model_folders / "clip_vision" / "models" / "image_encoder" / "model.safetensors", 1024)
    loader = nodes.IPAdapterKitUnifiedLoader()
    same_model, adapter, encoder = loader.load(model, "plus")
    assert same_model is model and adapter.checkpoint.spec.variant == "plus"
    assert adapter.checkpoint.source == "ip-adapter-plus_sd15.safetensors"
    _, again, encoder_again = loader.load(model, "plus")
    assert again is adapter and encoder_again is encoder  # the next queue reuses what was loaded
    (patched,) = nodes.IPAdapterKitApply().apply(model, adapter, 1.0, 0.0, 1.0, "average", "all", "",
                                                 image=torch.rand(1, 56, 56, 3), image_encoder=encoder)
    assert len(patched.model_options["transformer_options"]["patches_replace"]["attn2"]) == 16

    with pytest.raises(FileNotFoundError) as error:
        loader.load(model, "plus-face")
    message = str(error.value)
    assert "is an SD1.5 plus-face adapter" in message and "its name must say 'face'" in message
    assert "ip-adapter-plus_sd15.safetensors is SD1.5 plus" in message and str(model_folders) in message
    with pytest.raises(FileNotFoundError, match="needs OpenCLIP ViT-bigG/14; .* hold: .*model.safetensors is a scaled-"):
        write_adapter(model_folders / "ipadapter" / "ip-adapter_sd15_vit-G.safetensors", variant="base",
                      base_width=WIDTH, encoder_width=1280)
        loader.load(model, "vit-bigg")


def test_a_mismatched_pair_is_refused(nodes, model, model_folders):
    # a base adapter whose projection wants 1024-d embeddings next to an encoder that gives 512-d ones
    write_adapter(model_folders / "ipadapter" / "ip-adapter_sd15.safetensors", variant="base", base_width=WIDTH)
    write_encoder(model_folders / "clip_vision" / "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors", 512)
    with pytest.raises(ValueError, match="expects OpenCLIP ViT-H/14 image embeddings of width 1024, but the image encoder"):
        nodes.IPAdapterKitUnifiedLoader().load(model, "standard")


@pytest.fixture
def face_folder(tmp_path, nodes):
    """models/insightface pointed at a fresh folder with a pack (its models never run here)."""
    import folder_paths

    from devtools.face_models import face_from_template, write_face_pack

    write_face_pack(tmp_path / "insightface" / "models", [face_from_template((320.0, 320.0), 120.0)])
    saved = folder_paths.folder_names_and_paths.get("insightface")
    folder_paths.folder_names_and_paths["insightface"] = ([str(tmp_path / "insightface")], {".onnx"})
    yield
    if saved is not None:
        folder_paths.folder_names_and_paths["insightface"] = saved


def prediction(patcher, seed=1):
    from devtools.comfy_inprocess import random_unet_inputs, sigma_at

    inputs = random_unet_inputs(patcher, 768, seed=seed)
    patcher.patch_model()  # the LoRA's weight patches, as ComfyUI applies them to sample
    try:
        return inputs.predict(patcher, sigma_at(patcher, 500))
    finally:
        patcher.unpatch_model()


def test_faceid_loader_finds_by_content_and_applies_the_lora(nodes, model, model_folders, face_folder):
    from devtools.adapter_factory import random_faceid_adapter
    from devtools.comfy_inprocess import pack_module

    faceid = pack_module("ipadapter.faceid")
    glue = pack_module("comfyui_glue.faceid_lora")
    nested = random_faceid_adapter("faceid", base_width=WIDTH, seed=2, lora_scale=0.5)
    adapter_path = model_folders / "ipadapter" / "my face model.safetensors"  # any name: found by its tensors
    save_file({f"{group}.{key}": value for group, part in nested.items() for key, value in part.items()}, str(adapter_path))
    write_adapter(model_folders / "ipadapter" / "ip-adapter-plus-face_sd15.safetensors", variant="plus",
                  base_width=WIDTH, encoder_width=128)
    loader = nodes.IPAdapterKitUnifiedLoaderFaceID()
    apply, none = "apply (sidecar or in the file)", "none (I use ComfyUI's LoRA loader)"

    unchanged, adapter, encoder, analysis = loader.load(model, "faceid", none, 1.0, "buffalo_l", "CPU")
    assert unchanged is model and adapter.checkpoint.source == "my face model.safetensors"
    assert encoder is None and analysis.pack == "buffalo_l"  # faceid reads no CLIP features; no encoder here
    in_file = loader.load(model, "faceid", apply, 0.7, "buffalo_l", "CPU")[0]
    expected = glue.apply_adapter_lora(model, adapter.checkpoint, 0.7)
    assert torch.equal(prediction(in_file), prediction(expected)) and not torch.equal(prediction(in_file), prediction(model))

    # a sidecar beside the adapter wins: it is what ComfyUI's LoRA loader would apply
    other = faceid.FaceIDLoRA.from_checkpoint(pack_module("ipadapter.adapter_file").IPAdapterCheckpoint.from_state_dicts(
        **random_faceid_adapter("faceid", base_width=WIDTH, seed=9, lora_scale=0.5), source="other", base_width=None))
    sidecar = faceid.save_lora_sidecar(other, model_folders / "ipadapter" / "my face model_lora.safetensors")
    beside = loader.load(model, "faceid", apply, 0.7, "buffalo_l", "CPU")[0]
    assert torch.equal(prediction(beside), prediction(glue.apply_lora_sidecar(model, sidecar, 0.7)))

    with pytest.raises(ValueError) as error:
        nodes.IPAdapterKitUnifiedLoader().load(model, "faceid")
    assert "\n" not in str(error.value) and "IP-Adapter Unified Loader FaceID" in str(error.value)
    with pytest.raises(FileNotFoundError) as error:  # faceid-plus reads the face crop's CLIP features
        loader.load(model, "faceid-plus", apply, 1.0, "buffalo_l", "CPU")
    assert "\n" not in str(error.value) and "is an SD1.5 faceid-plus adapter" in str(error.value)
