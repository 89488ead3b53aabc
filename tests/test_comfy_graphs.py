"""The pack inside a running ComfyUI server: real graphs, full-size SD1.5 architecture (random weights)."""
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from devtools.adapter_factory import write_flat_adapter
from devtools.clip_vision import transformers_model
from devtools.comfyui_harness import ComfyUIError, txt2img_graph

pytestmark = pytest.mark.slow

ADAPTER = "ip-adapter_sd15.safetensors"
ENCODER = "clip-vision-test-small.safetensors"  # a narrow tower with ViT-H's 1024-d output


@pytest.fixture(scope="module")
def server(comfyui_server, sd15_checkpoint_name):
    write_flat_adapter(comfyui_server.models_dir("ipadapter") / ADAPTER, seed=7)
    encoder = transformers_model(width=128, layers=2, heads=2, patch=14, image=224, embed_dim=1024, seed=3)
    save_file({k: v.contiguous() for k, v in encoder.state_dict().items()}, str(comfyui_server.models_dir("clip_vision") / ENCODER))
    rng = np.random.default_rng(0)
    comfyui_server.write_input_image("red.png", np.tile([0.9, 0.1, 0.1], (96, 128, 1)) + rng.normal(0, 0.05, (96, 128, 3)))
    comfyui_server.write_input_image("blue.png", np.tile([0.1, 0.2, 0.9], (96, 128, 1)) + rng.normal(0, 0.05, (96, 128, 3)))
    return comfyui_server


def render(server, checkpoint, weight=None, reference="red.png", prefix="plain"):
    graph = txt2img_graph(checkpoint, positive="a photo", negative="", steps=1, filename_prefix=prefix)
    if weight is not None:
        graph["reference"] = {"class_type": "LoadImage", "inputs": {"image": reference}}
        graph["ipadapter"] = {"class_type": "IPAdapterKitSimple", "inputs": {
            "model": ["checkpoint", 0], "image": ["reference", 0], "weight": weight,
            "ipadapter_file": ADAPTER, "clip_name": ENCODER}}
        graph["sampler"]["inputs"]["model"] = ["ipadapter", 0]
    (image,) = server.run_prompt(graph).load_images()
    return image


def test_simple_node_in_a_real_graph(server, sd15_checkpoint_name):
    plain = render(server, sd15_checkpoint_name)
    off = render(server, sd15_checkpoint_name, weight=0.0, prefix="off")
    red = render(server, sd15_checkpoint_name, weight=1.0, prefix="red")
    blue = render(server, sd15_checkpoint_name, weight=1.0, reference="blue.png", prefix="blue")
    half = render(server, sd15_checkpoint_name, weight=0.5, prefix="half")
    assert plain.shape == (64, 64, 3) and np.isfinite(plain).all()
    assert np.array_equal(off, plain)  # λ = 0 is the model without the adapter, bit for bit
    for changed in (red, blue, half):
        assert np.abs(changed - plain).mean() > 1e-3
    assert np.abs(red - blue).mean() > 1e-3  # the reference image matters
    assert np.abs(red - half).mean() > 1e-3  # and so does λ


def test_the_everyday_apply_is_the_advanced_one_at_its_defaults(comfy):
    """Apply IP-Adapter (image + encoder, a weight type, a window, a mask) patches a MODEL as Apply IP-Adapter
    (Advanced) does with the same settings and the rest at its defaults: the same noise prediction, bit for bit
    (in-process, on a small SD1.5 UNet)."""
    from devtools.comfy_inprocess import random_unet_inputs, sigma_at, small_sd15_apply_setup

    nodes, model, adapter, encoder = small_sd15_apply_setup(ADAPTER)
    image = torch.rand(1, 56, 56, 3, generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(8, 8)
    mask[:, :5] = 1.0
    settings = dict(image=image, image_encoder=encoder, attn_mask=mask, weight_type="ease in")
    (everyday,) = nodes.IPAdapterKitApplySimple().apply(model, adapter, 0.7, 0.0, 0.6, **settings)
    (advanced,) = nodes.IPAdapterKitApply().apply(model, adapter, 0.7, 0.0, 0.6, "average", "all", "", **settings)
    inputs, sigma = random_unet_inputs(model, 768), sigma_at(model, 800)  # in the window (up to 60 %)
    expected = inputs.predict(advanced, sigma)
    assert torch.equal(inputs.predict(everyday, sigma), expected)
    assert (expected - inputs.predict(model, sigma)).abs().mean() > 1e-4
    with pytest.raises(ValueError, match="neither embeds nor image"):
        nodes.IPAdapterKitApplySimple().apply(model, adapter, 1.0, 0.0, 1.0, "linear", image=image)


@pytest.mark.comfyui_2024
def test_nodes_are_registered_with_tooltips(server):
    info = server.object_info()
    ours = {name: node for name, node in info.items() if name.startswith("IPAdapterKit")}
    assert set(ours) == {
        "IPAdapterKitLoader", "IPAdapterKitUnifiedLoader", "IPAdapterKitEncoderLoader",
        "IPAdapterKitEncoderFromCLIPVision", "IPAdapterKitEncode", "IPAdapterKitCombineEmbeds",
        "IPAdapterKitFrameWeights", "IPAdapterKitPrepImage", "IPAdapterKitNoise", "IPAdapterKitEncodeTiled",
        "IPAdapterKitRegion", "IPAdapterKitApplySimple", "IPAdapterKitApply", "IPAdapterKitAttentionMap",
        "IPAdapterKitSimple", "IPAdapterKitSaveEmbeds", "IPAdapterKitLoadEmbeds", "IPAdapterKitModelCheck",
        "IPAdapterKitUnifiedLoaderFaceID", "IPAdapterKitFaceAnalysisLoader", "IPAdapterKitEncodeFace",
    }
    assert ADAPTER in ours["IPAdapterKitLoader"]["input"]["required"]["ipadapter_file"][0]
    for apply in ("IPAdapterKitApplySimple", "IPAdapterKitApply"):
        weight = ours[apply]["input"]["required"]["weight"][1]
        assert weight["min"] <= -1 and weight["max"] >= 3 and weight["default"] == 1.0
    # the everyday Apply: the advanced one's inputs, the everyday ones only
    everyday, advanced = (ours[kind]["input"] for kind in ("IPAdapterKitApplySimple", "IPAdapterKitApply"))
    assert list(everyday["required"]) == ["model", "ipadapter", "weight", "start_at", "end_at", "weight_type"]
    assert list(everyday["optional"]) == ["embeds", "image", "image_encoder", "attn_mask"]
    for section, inputs in everyday.items():
        for name, spec in inputs.items():
            if name != "weight":  # the advanced one's tooltip adds what λ does to regions
                assert spec == {**advanced["required"], **advanced["optional"]}[name], name
    for node in ours.values():
        assert node["category"].startswith("ipadapter_kit")
        for section in ("required", "optional"):
            for name, spec in node["input"].get(section, {}).items():
                assert len(spec) > 1 and spec[1].get("tooltip"), (node["name"], name)


def test_graph_errors_are_one_line(server, sd15_checkpoint_name):
    # an SDXL adapter (70 layers, 2048-wide tokens; ViT-H's 1024-d embedding, as the test encoder's) on the SD1.5 MODEL
    write_flat_adapter(server.models_dir("ipadapter") / "ip-adapter_sdxl_vit-h.safetensors", seed=5, family="sdxl")
    graph = txt2img_graph(sd15_checkpoint_name)
    graph["reference"] = {"class_type": "LoadImage", "inputs": {"image": "red.png"}}
    graph["ipadapter"] = {"class_type": "IPAdapterKitSimple", "inputs": {
        "model": ["checkpoint", 0], "image": ["reference", 0], "weight": 1.0,
        "ipadapter_file": "ip-adapter_sdxl_vit-h.safetensors", "clip_name": ENCODER}}
    graph["sampler"]["inputs"]["model"] = ["ipadapter", 0]
    prompt_id = server.queue_prompt(graph)
    with pytest.raises(ComfyUIError):
        server.wait_for_history(prompt_id)
    status = server.request("GET", f"/history/{prompt_id}")[prompt_id]["status"]
    (error,) = [m[1] for m in status["messages"] if m[0] == "execution_error"]
    message = error["exception_message"].strip()
    assert error["node_type"] == "IPAdapterKitSimple"
    assert "\n" not in message and "ip-adapter_sdxl_vit-h.safetensors' is an SDXL adapter, but the MODEL is SD1.5" in message
