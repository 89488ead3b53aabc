"""The FaceID nodes: graphs through a real ComfyUI server (Face Analysis Loader -> Encode Face -> Apply -> KSampler on
the random full-size SD1.5, the unified FaceID loader's LoRA against ComfyUI's LoraLoaderModelOnly, one-line
errors), and Apply's controls on face embeds in-process on a small SD1.5 UNet. The face models are ONNX files built
at run time (devtools/face_models.py: a detector that places a known face on bright images)."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from devtools.adapter_factory import random_adapter, random_faceid_adapter
from devtools.clip_vision import transformers_model
from devtools.comfy_import import REPO_ROOT
from devtools.comfy_inprocess import noise_prediction, pack_module
from devtools.comfyui_harness import ComfyUIError, txt2img_graph
from devtools.face_models import face_from_template, letterbox_scale, wrong_detector_model, write_face_pack, write_model
from test_nodes import WIDTH, encoder, model, nodes  # noqa: F401  (module fixtures)

SIZE, DETECTOR = 160, 640
FACEID = "ip-adapter-faceid_sd15.safetensors"
PLUSV2 = "ip-adapter-faceid-plusv2_sd15.safetensors"
SIDECAR = "ip-adapter-faceid_sd15_lora.safetensors"
ENCODER = "clip-vision-faceid-test.safetensors"  # a narrow tower with ViT-H's 1024-d output
ENCODER_WIDTH = 128
PACKS = {"buffalo_l": "complete", "no_recognition": "no recognition model", "bad_detector": "wrong detector"}


def planted_face():
    """One face in the middle of a SIZE x SIZE image, as the detector reports it (detector pixels)."""
    scale = letterbox_scale(SIZE, SIZE, DETECTOR)
    return face_from_template((SIZE / 2 * scale, SIZE / 2 * scale), 0.3 * SIZE * scale, 5.0, score=0.9, stride=32)


def write_packs(root):
    """``<root>/models/<pack>``: a complete pack, one without its recognition model, one with a wrong detector."""
    write_face_pack(root / "models", [planted_face()])
    write_face_pack(root / "models", [planted_face()], pack="no_recognition", recognition_name=None)
    bad = write_face_pack(root / "models", [planted_face()], pack="bad_detector")
    write_model(wrong_detector_model(), bad / "det_10g.onnx")


def picture(seed: int, bright: bool = True) -> np.ndarray:
    """A noisy image: bright ones show the planted face to the detector, dark ones none."""
    low, high = (90, 256) if bright else (0, 30)
    return np.random.default_rng(seed).integers(low, high, (SIZE, SIZE, 3), dtype=np.uint8)


def as_batch(*images) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).float() / 255.0


def one_line(error) -> str:
    message = str(error.value)
    assert "\n" not in message and message
    return message


# --- through a ComfyUI server ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(comfyui_server, sd15_checkpoint_name):
    from ipadapter.adapter_file import IPAdapterCheckpoint
    from ipadapter.faceid import FaceIDLoRA, save_lora_sidecar

    write_packs(comfyui_server.models_dir("insightface"))
    nested = random_faceid_adapter("faceid", base_width=320, seed=11, lora_scale=0.5)
    flat = {f"{group}.{key}": value for group, part in nested.items() for key, value in part.items()}
    save_file(flat, str(comfyui_server.models_dir("ipadapter") / FACEID))
    checkpoint = IPAdapterCheckpoint.from_state_dicts(**nested, source=FACEID, base_width=None)
    # the released sidecar (fp16) in models/loras, where LoraLoaderModelOnly and our loader both find it
    save_lora_sidecar(FaceIDLoRA.from_checkpoint(checkpoint), comfyui_server.models_dir("loras") / SIDECAR)
    nested = random_faceid_adapter("faceid-plus", base_width=320, seed=12, clip_width=ENCODER_WIDTH, dtype=torch.float16)
    save_file({f"{group}.{key}": value for group, part in nested.items() for key, value in part.items()},
              str(comfyui_server.models_dir("ipadapter") / PLUSV2))
    tower = transformers_model(width=ENCODER_WIDTH, layers=2, heads=2, patch=14, image=224, embed_dim=1024, seed=3)
    save_file({k: v.contiguous() for k, v in tower.state_dict().items()}, str(comfyui_server.models_dir("clip_vision") / ENCODER))
    for name, seed, bright in (("face_a.png", 1, True), ("face_b.png", 2, True), ("no_face.png", 3, False)):
        comfyui_server.write_input_image(name, picture(seed, bright))
    return comfyui_server


def face_graph(checkpoint, prefix, adapter=FACEID, weight=1.0, face="face_a.png", shortcut=1.0, pack="buffalo_l"):
    """txt2img whose MODEL goes through Face Analysis Loader -> Encode Face -> Apply IP-Adapter, saving the latent."""
    graph = txt2img_graph(checkpoint, positive="a portrait", negative="", steps=1)
    del graph["decode"], graph["save"]
    graph["latent_out"] = {"class_type": "SaveLatent", "inputs": {"samples": ["sampler", 0],
                                                                  "filename_prefix": f"latents/{prefix}"}}
    if weight is None:
        return graph
    graph["faces"] = {"class_type": "IPAdapterKitFaceAnalysisLoader",
                      "inputs": {"pack": pack, "provider": "CPU", "detector_size": DETECTOR}}
    graph["face"] = {"class_type": "LoadImage", "inputs": {"image": face}}
    graph["adapter"] = {"class_type": "IPAdapterKitLoader", "inputs": {"ipadapter_file": adapter}}
    graph["encode"] = {"class_type": "IPAdapterKitEncodeFace", "inputs": {
        "face_analysis": ["faces", 0], "image": ["face", 0], "ipadapter": ["adapter", 0], "weight_faceidv2": shortcut}}
    if adapter == PLUSV2:
        graph["encoder"] = {"class_type": "IPAdapterKitEncoderLoader", "inputs": {"clip_name": ENCODER}}
        graph["encode"]["inputs"]["image_encoder"] = ["encoder", 0]
    graph["apply"] = {"class_type": "IPAdapterKitApplySimple", "inputs": {
        "model": ["checkpoint", 0], "ipadapter": ["adapter", 0], "embeds": ["encode", 0], "weight": weight,
        "start_at": 0.0, "end_at": 1.0, "weight_type": "linear"}}
    graph["sampler"]["inputs"]["model"] = ["apply", 0]
    return graph


def latent_of(server, graph) -> torch.Tensor:
    result = server.run_prompt(graph)
    (saved,) = [entry for output in result.history["outputs"].values() for entry in output.get("latents", [])]
    return load_file(str(server.output_dir / saved["subfolder"] / saved["filename"]))["latent_tensor"]


def differs(a, b, at_least=1e-4) -> bool:
    return bool((a - b).norm() / b.norm() > at_least)


@pytest.fixture(scope="module")
def latents(server, sd15_checkpoint_name):
    runs = {"plain": dict(weight=None), "faceid": {}, "faceid_off": dict(weight=0.0), "faceid_half": dict(weight=0.5),
            "faceid_b": dict(face="face_b.png"), "plusv2": dict(adapter=PLUSV2),
            "plusv2_s2": dict(adapter=PLUSV2, shortcut=2.0)}
    return {name: latent_of(server, face_graph(sd15_checkpoint_name, name, **kwargs)) for name, kwargs in runs.items()}


def test_face_graphs_run_end_to_end(latents):
    plain = latents["plain"]
    assert plain.shape == (1, 4, 8, 8) and torch.isfinite(plain).all()
    assert torch.equal(latents["faceid_off"], plain)  # λ = 0 (no LoRA here) is the model without the adapter
    for name in ("faceid", "faceid_half", "faceid_b", "plusv2", "plusv2_s2"):
        assert differs(latents[name], plain), name
    assert differs(latents["faceid"], latents["faceid_half"])  # λ matters
    assert differs(latents["faceid"], latents["faceid_b"])  # and the face
    assert differs(latents["plusv2"], latents["plusv2_s2"])  # and plusv2's shortcut weight


def unified_graph(checkpoint, prefix, lora):
    graph = face_graph(checkpoint, prefix)
    del graph["faces"], graph["adapter"]
    graph["unified"] = {"class_type": "IPAdapterKitUnifiedLoaderFaceID", "inputs": {
        "model": ["checkpoint", 0], "preset": "faceid", "lora": lora, "lora_strength": 0.8, "pack": "buffalo_l",
        "provider": "CPU"}}
    graph["encode"]["inputs"].update(face_analysis=["unified", 3], ipadapter=["unified", 1])
    graph["apply"]["inputs"].update(model=["unified", 0], ipadapter=["unified", 1])
    return graph


def test_unified_loader_lora_equals_comfyuis_lora_loader(server, sd15_checkpoint_name, latents):
    ours = latent_of(server, unified_graph(sd15_checkpoint_name, "lora_ours", "apply (sidecar or in the file)"))
    graph = unified_graph(sd15_checkpoint_name, "lora_comfy", "none (I use ComfyUI's LoRA loader)")
    graph["lora"] = {"class_type": "LoraLoaderModelOnly", "inputs": {
        "model": ["unified", 0], "lora_name": SIDECAR, "strength_model": 0.8}}
    graph["apply"]["inputs"]["model"] = ["lora", 0]
    theirs = latent_of(server, graph)
    assert torch.allclose(ours, theirs, rtol=0, atol=1e-5), (ours - theirs).abs().max()
    assert differs(ours, latents["faceid"], 1e-3)  # the LoRA matters: without it, the same graph differs


def failure(server, graph) -> tuple[str, str]:
    prompt_id = server.queue_prompt(graph)
    with pytest.raises(ComfyUIError):
        server.wait_for_history(prompt_id)
    status = server.request("GET", f"/history/{prompt_id}")[prompt_id]["status"]
    (error,) = [message[1] for message in status["messages"] if message[0] == "execution_error"]
    message = error["exception_message"].strip()
    assert "\n" not in message, message
    return error["node_type"], message


def test_bad_inputs_are_one_line_errors(server, sd15_checkpoint_name):
    graph = face_graph(sd15_checkpoint_name, "batch")
    graph["second"] = {"class_type": "LoadImage", "inputs": {"image": "no_face.png"}}
    graph["batch"] = {"class_type": "ImageBatch", "inputs": {"image1": ["face", 0], "image2": ["second", 0]}}
    graph["encode"]["inputs"]["image"] = ["batch", 0]
    node, message = failure(server, graph)
    assert node == "IPAdapterKitEncodeFace" and "no face found in image 1 of the batch of 2" in message

    graph = face_graph(sd15_checkpoint_name, "ordinary")  # a FaceID adapter given embeds of Encode Image
    graph["encoder"] = {"class_type": "IPAdapterKitEncoderLoader", "inputs": {"clip_name": ENCODER}}
    graph["encode"] = {"class_type": "IPAdapterKitEncode", "inputs": {
        "image_encoder": ["encoder", 0], "image": ["face", 0], "crop": "crop"}}
    node, message = failure(server, graph)
    assert node == "IPAdapterKitApplySimple" and f"'{FACEID}' is a FaceID adapter (faceid)" in message
    assert "hold" in message and "image features only" in message

    node, message = failure(server, face_graph(sd15_checkpoint_name, "no_recognition", pack="no_recognition"))
    assert node == "IPAdapterKitFaceAnalysisLoader" and "no face recognition model in" in message
    assert "no_recognition" in message and "w600k*.onnx or glintr*.onnx" in message
    node, message = failure(server, face_graph(sd15_checkpoint_name, "bad_detector", pack="bad_detector"))
    assert "det_10g.onnx' is not an SCRFD face detector" in message and "2 output(s)" in message


def test_nodes_load_and_explain_without_insightface(tmp_path):
    """insightface made unimportable in a fresh process: the pack imports as ComfyUI imports it, lists the pack,
    and running the loader gives the one-line install hint."""
    write_packs(tmp_path / "insightface")
    code = (
        "import sys; sys.modules['insightface'] = None\n"
        "from devtools.comfy_import import import_pack\n"
        "pack = import_pack()\n"
        "import folder_paths\n"
        f"folder_paths.folder_names_and_paths['insightface'] = ([{str(tmp_path / 'insightface')!r}], {{'.onnx'}})\n"
        "node = pack.NODE_CLASS_MAPPINGS['IPAdapterKitFaceAnalysisLoader']\n"
        "assert 'buffalo_l' in node.INPUT_TYPES()['required']['pack'][0]\n"
        "try:\n"
        "    node().load('buffalo_l', 'auto', 640)\n"
        "except ValueError as error:\n"
        "    print('ERROR', error)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
                            check=False, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert result.returncode == 0, result.stderr[-3000:]
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("ERROR")]
    assert "insightface >= 2.1" in line and 'pip install "insightface>=2.1" onnxruntime' in line


# --- Apply's controls on face embeds, in-process ---------------------------------------------------------


@pytest.fixture(scope="module")
def face_analysis(nodes, tmp_path_factory):
    import folder_paths

    root = tmp_path_factory.mktemp("faces") / "insightface"
    write_packs(root)
    saved = folder_paths.folder_names_and_paths.get("insightface")
    folder_paths.folder_names_and_paths["insightface"] = ([str(root)], {".onnx"})
    assert set(PACKS) <= set(nodes.IPAdapterKitFaceAnalysisLoader.INPUT_TYPES()["required"]["pack"][0])
    (analysis,) = nodes.IPAdapterKitFaceAnalysisLoader().load("buffalo_l", "CPU", DETECTOR)
    yield analysis
    if saved is not None:
        folder_paths.folder_names_and_paths["insightface"] = saved


def small_adapter(nodes, variant, name, **kwargs):
    checkpoint = pack_module("ipadapter.adapter_file").IPAdapterCheckpoint.from_state_dicts(
        **random_faceid_adapter(variant, base_width=WIDTH, seed=5, **kwargs), source=name, base_width=None)
    return nodes.LoadedAdapter(checkpoint, checkpoint.build_projection())


@pytest.fixture(scope="module")
def sample():
    generator = torch.Generator().manual_seed(0)
    return torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 77, 768, generator=generator)


def predict(patched, sample, step=500):
    latent, context = sample
    sigma = patched.model.model_sampling.sigmas[step].expand(2).clone()
    return noise_prediction(patched, latent, sigma, context, cond_or_uncond=(0, 1))


def test_apply_takes_face_embeds_with_every_control(nodes, model, face_analysis, sample):
    from ipadapter.weighting import WEIGHT_TYPES

    adapter = small_adapter(nodes, "faceid", FACEID)
    embeds, crops = nodes.IPAdapterKitEncodeFace().encode(face_analysis, as_batch(picture(1), picture(2)), adapter, 1.0)
    assert embeds.face_embeds.shape == (2, 512) and crops.shape == (2, 224, 224, 3)
    mask = torch.zeros(64, 64)
    mask[:, :32] = 1.0
    plain = predict(model, sample)
    apply = nodes.IPAdapterKitApply().apply
    (region, _, _) = nodes.IPAdapterKitRegion().region(embeds, 1.0, "linear", 0.0, 1.0, 1.0, mask=mask)
    for weight_type in WEIGHT_TYPES:
        (off,) = apply(model, adapter, 0.0, 0.0, 1.0, "concat", "all", "", embeds=embeds, attn_mask=mask,
                       weight_type=weight_type, batch_mode="one per latent", regions=region)
        assert torch.equal(predict(off, sample), plain), weight_type
    results = {}
    for name, settings in {"linear": {}, "ease in": dict(weight_type="ease in"), "mask": dict(attn_mask=mask),
                           "per latent": dict(batch_mode="one per latent"), "concat": dict(combine="concat"),
                           "half": dict(weight=0.5)}.items():
        options = {"weight": 1.0, "combine": "average", **settings}
        (patched,) = apply(model, adapter, options.pop("weight"), 0.0, 1.0, options.pop("combine"), "all", "",
                           embeds=embeds, **options)
        results[name] = predict(patched, sample)
    for name, result in results.items():
        assert differs(result, plain), name
        assert name == "linear" or differs(result, results["linear"]), name
    (late,) = apply(model, adapter, 1.0, 0.9, 1.0, "average", "all", "", embeds=embeds)  # window: not at step 500
    assert torch.equal(predict(late, sample), plain)
    (regional,) = apply(model, adapter, 1.0, 0.0, 1.0, "average", "all", "", regions=region)
    assert differs(predict(regional, sample), plain)
    (everyday,) = nodes.IPAdapterKitApplySimple().apply(model, adapter, 1.0, 0.0, 1.0, "linear", embeds=embeds)
    assert torch.equal(predict(everyday, sample), results["linear"])


def test_plusv2_shortcut_weight_travels_in_the_embeds(nodes, model, encoder, face_analysis, sample, tmp_path):
    import folder_paths

    adapter = small_adapter(nodes, "faceid-plus", PLUSV2, clip_width=ENCODER_WIDTH)
    images = as_batch(picture(1), picture(2))
    encode = nodes.IPAdapterKitEncodeFace().encode
    (one, _), (two, _) = (encode(face_analysis, images, adapter, s, image_encoder=encoder) for s in (1.0, 2.0))
    assert one.has_clip_features and two.shortcut_scale == 2.0
    (combined,) = nodes.IPAdapterKitCombineEmbeds().combine(two, "average", embeds_2=two)
    folder_paths.set_output_directory(str(tmp_path))
    nodes.IPAdapterKitSaveEmbeds().save(two, "face")
    (loaded,) = nodes.IPAdapterKitLoadEmbeds().load("ipadapter_embeds/face_00001.safetensors [output]")
    assert combined.shortcut_scale == loaded.shortcut_scale == 2.0
    for batch_mode in ("all latents", "one per latent"):
        a, b, c = (predict(nodes.patch_model(model, adapter, embeds, 1.0, batch_mode=batch_mode), sample)
                   for embeds in (one, two, loaded))
        assert differs(a, b) and torch.allclose(b, c, rtol=0, atol=1e-5), batch_mode  # loaded: other memory layout


def test_encode_face_refusals(nodes, face_analysis, encoder):
    image = as_batch(picture(1))
    plus = small_adapter(nodes, "faceid-plus", PLUSV2, clip_width=ENCODER_WIDTH)
    with pytest.raises(ValueError) as error:
        nodes.IPAdapterKitEncodeFace().encode(face_analysis, image, plus, 1.0)
    assert f"'{PLUSV2}' (faceid-plusv2) also shows the aligned face crop" in one_line(error)
    base = pack_module("ipadapter.adapter_file").IPAdapterCheckpoint.from_state_dicts(
        **random_adapter("base", base_width=WIDTH), source="ip-adapter_sd15.safetensors", base_width=None)
    with pytest.raises(ValueError) as error:
        nodes.IPAdapterKitEncodeFace().encode(face_analysis, image, nodes.LoadedAdapter(base, None), 1.0)
    assert "takes image features, not faces" in one_line(error) and "Encode Image" in str(error.value)


def test_insightface_folder_is_registered_with_extra_paths_kept(nodes, tmp_path):
    import folder_paths

    saved = folder_paths.folder_names_and_paths.get("insightface")
    folder_paths.folder_names_and_paths["insightface"] = ([str(tmp_path / "shared")], set())  # as extra paths leave it
    try:
        nodes.register_model_folder()
        paths, extensions = folder_paths.folder_names_and_paths["insightface"]
        assert paths == [str(tmp_path / "shared"), os.path.join(folder_paths.models_dir, "insightface")]
        assert ".onnx" in extensions
        write_face_pack(tmp_path / "shared" / "models", [planted_face()], pack="antelopev2")
        assert "antelopev2" in nodes.list_files("face model packs")
    finally:
        if saved is not None:
            folder_paths.folder_names_and_paths["insightface"] = saved
