"""``python -m training.eval`` on random-weight models: the math, the loaders, both modes end to end, errors."""
from __future__ import annotations

import argparse
import csv
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from training.clip_score import ClipFileError, clipscore, cosine, load_scoring_clip, score_samples, summarize
from training.eval import build_report, main
from training.eval_data import EvalError, Reference, load_references
from training_fixtures import write_model_files

REPO = Path(__file__).resolve().parents[1]

TINY_CLIP = {  # an OpenCLIP config of CLIP's layout, scaled down (the BPE vocabulary is the real one)
    "embed_dim": 16,
    "vision_cfg": {"image_size": 28, "layers": 2, "width": 32, "head_width": 16, "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def spread(module: torch.nn.Module, seed: int) -> None:
    """Random weights with some spread, so different images and captions get clearly different embeddings."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if parameter.dim() > 1 or "embedding" in name:
                parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A full OpenCLIP checkpoint (.safetensors) of a tiny CLIP, its config JSON and the in-memory model."""
    root = tmp_path_factory.mktemp("clip")
    config = root / "tiny-eval-clip.json"
    config.write_text(json.dumps(TINY_CLIP))
    model = open_clip.model.CLIP(**TINY_CLIP).eval()
    spread(model, seed=0)
    path = root / "tiny_clip.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path, config, model


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """A JSONL manifest of four distinct pictures with captions."""
    root = tmp_path_factory.mktemp("refs")
    (root / "images").mkdir()
    rows = []
    for index, (color, shape) in enumerate([((220, 40, 40), "circle"), ((40, 180, 60), "square"),
                                            ((40, 70, 220), "stripes"), ((235, 210, 40), "noise")]):
        generator = torch.Generator().manual_seed(index)
        base = torch.tensor(color, dtype=torch.float32).view(1, 1, 3) / 255
        pattern = torch.rand(6, 8, 1, generator=generator).repeat_interleave(8, 0).repeat_interleave(8, 1)
        pixels = (base * (0.4 + 0.6 * pattern) * 255).clamp(0, 255).byte().numpy()
        Image.fromarray(pixels).save(root / "images" / f"ref{index}.png")
        rows.append({"image": f"images/ref{index}.png", "text": f"a {shape} picture in colour {index}"})
    manifest = root / "refs.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return manifest


def clip_args(tiny_clip) -> list[str]:
    path, config, _ = tiny_clip
    return ["--clip", str(path), "--clip-model", str(config), "--batch-size", "3"]


# --- the math on hand-made embeddings --------------------------------------------------


def test_cosine_clipscore_and_means_on_hand_made_embeddings():
    assert math.isclose(float(cosine(torch.tensor([3.0, 4.0]), torch.tensor([4.0, 3.0]))), 24 / 25, abs_tol=1e-12)
    assert math.isclose(float(cosine(torch.tensor([2.0, 0.0]), torch.tensor([5.0, 0.0]))), 1.0, abs_tol=1e-12)  # scale-free
    assert float(cosine(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 7.0]))) == 0.0
    # CLIPScore = 2.5 * max(cos, 0): scaled, and negatives clipped to 0 (raw cosines are not clipped)
    assert torch.allclose(clipscore(torch.tensor([0.96, 0.2, -0.5], dtype=torch.float64)),
                          torch.tensor([2.4, 0.5, 0.0], dtype=torch.float64))

    e1, e2, e3 = torch.eye(3, dtype=torch.float64)
    # 2 references x 2 samples, embeddings in 3-d
    generated = torch.stack([torch.stack([e1, e1 + e2]), torch.stack([-e2, e3])])
    reference = torch.stack([e1, e2])
    caption = torch.stack([e2, e3])
    scores = score_samples(generated, reference, caption)
    expected_i = torch.tensor([[1.0, 1 / math.sqrt(2)], [-1.0, 0.0]], dtype=torch.float64)
    expected_t = torch.tensor([[0.0, 1 / math.sqrt(2)], [0.0, 1.0]], dtype=torch.float64)
    assert torch.allclose(scores["clip_i"], expected_i) and torch.allclose(scores["clip_t"], expected_t)
    summary = summarize(scores)
    assert (summary["n_references"], summary["n_samples"]) == (2, 4)
    assert math.isclose(summary["clip_i"]["cosine"], (1 + 1 / math.sqrt(2) - 1 + 0) / 4)
    assert math.isclose(summary["clip_i"]["clipscore"], 2.5 * (1 + 1 / math.sqrt(2)) / 4)  # the -1 counts as 0
    assert math.isclose(summary["clip_t"]["cosine"], (1 / math.sqrt(2) + 1) / 4)
    assert math.isclose(summary["clip_t"]["clipscore"], 2.5 * (1 / math.sqrt(2) + 1) / 4)
    with pytest.raises(ValueError, match="expected \\[R, K, D\\]"):
        score_samples(generated[0], reference, caption)

    # the report's per-image values: means over each reference's samples, clipped before scaling
    args = argparse.Namespace(samples_per_image=2, clip="clip.safetensors", generated="gen")
    refs = [Reference("a", "a.png", "cap a"), Reference("b", "b.png", "cap b")]
    report = build_report(args, "2 references", "tiny", refs, [["a_0.png", "a_1.png"], ["b_0.png", "b_1.png"]], scores)
    second = report["per_image"][1]
    assert (second["reference"], second["clip_i_samples"], second["clip_t_samples"]) == ("b", [-1.0, 0.0], [0.0, 1.0])
    assert (second["clip_i"], second["clip_i_clipscore"], second["clip_t"], second["clip_t_clipscore"]) == (-0.5, 0.0, 0.5, 1.25)
    assert report["summary"] == summary and report["protocol"]["samples_per_image"] == 2


# --- the scoring CLIP loaders -------------------------------------------------------------


def test_open_clip_checkpoint_loads_with_its_weights_and_bundled_tokenizer(tiny_clip):
    path, config, model = tiny_clip
    clip = load_scoring_clip(path, str(config))
    assert clip.kind == "open_clip" and clip.image_size == 28 and clip.context_length == 77
    images = [Image.new("RGB", (40, 30), (200, 30, 30)), Image.new("RGB", (30, 50), (20, 30, 200))]
    captions = ["a red thing", "a blue thing, photographed from far away"]
    image_embeds, text_embeds = clip.encode_images(images), clip.encode_texts(captions)
    assert image_embeds.shape == text_embeds.shape == (2, 16)
    with torch.no_grad():  # the in-memory model and open_clip's own tokenize give the same embeddings
        expected_images = model.encode_image(torch.stack([clip.pixels(i) for i in images]))
        expected_text = model.encode_text(open_clip.tokenize(captions))
    torch.testing.assert_close(image_embeds, expected_images, atol=1e-5, rtol=0)
    torch.testing.assert_close(text_embeds, expected_text, atol=1e-5, rtol=0)
    assert cosine(image_embeds[0], image_embeds[1]) < 0.99 and cosine(text_embeds[0], text_embeds[1]) < 0.99


def test_transformers_clip_folder_and_file_load_with_their_weights(tmp_path):
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(
        text_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                           image_size=28, patch_size=14), projection_dim=16)
    model = CLIPModel(config).eval()
    spread(model, seed=1)
    model.save_pretrained(tmp_path)
    images = [Image.new("RGB", (40, 30), (200, 30, 30)), Image.new("RGB", (30, 50), (20, 30, 200))]
    captions = ["a red thing", "a blue thing"]
    for source in (tmp_path, tmp_path / "model.safetensors"):
        clip = load_scoring_clip(source)
        assert clip.kind == "transformers" and clip.image_size == 28
        image_embeds, text_embeds = clip.encode_images(images), clip.encode_texts(captions)
        with torch.no_grad():
            pixels = torch.stack([clip.pixels(i) for i in images])
            expected_images = model.get_image_features(pixel_values=pixels)
            expected_text = model.get_text_features(input_ids=open_clip.tokenize(captions))
        expected_images = getattr(expected_images, "pooler_output", expected_images)
        expected_text = getattr(expected_text, "pooler_output", expected_text)
        assert image_embeds.shape == text_embeds.shape == (2, 16)
        torch.testing.assert_close(image_embeds, expected_images, atol=1e-5, rtol=0)
        torch.testing.assert_close(text_embeds, expected_text, atol=1e-5, rtol=0)


def test_wrong_clip_files_are_one_line_errors(tmp_path, tiny_clip):
    path, config, model = tiny_clip
    cases = []
    cases.append((tmp_path / "missing.safetensors", "ViT-L-14", "does not exist"))
    visual_only = tmp_path / "vision_only.safetensors"
    save_file({f"visual.{k}": v.contiguous() for k, v in model.visual.state_dict().items()}, str(visual_only))
    cases.append((visual_only, str(config), "image-only CLIP (no text tower"))
    adapter = tmp_path / "ip-adapter.safetensors"
    save_file({"image_proj.proj.weight": torch.zeros(4, 4)}, str(adapter))
    cases.append((adapter, "ViT-L-14", "not a CLIP model"))
    cases.append((path, "ViT-B-32", "does not match OpenCLIP 'ViT-B-32'"))
    cases.append((path, "No-Such-Model", "OpenCLIP has no model config"))
    cases.append((path, "hf-hub:someone/clip", "names a hub or folder schema"))
    transformers_file = tmp_path / "alone" / "clip.safetensors"
    transformers_file.parent.mkdir()
    save_file({"text_model.embeddings.token_embedding.weight": torch.zeros(4, 4)}, str(transformers_file))
    cases.append((transformers_file, "ViT-L-14", "no config.json beside it"))
    vision_file = tmp_path / "clip_vision_h.safetensors"  # what ComfyUI's models/clip_vision holds
    save_file({"vision_model.embeddings.patch_embedding.weight": torch.zeros(4, 3, 14, 14)}, str(vision_file))
    cases.append((vision_file, "ViT-L-14", "image-only CLIP (a transformers vision model"))
    vision_folder = tmp_path / "vision_folder"
    vision_folder.mkdir()
    (vision_folder / "config.json").write_text(json.dumps({"model_type": "clip_vision_model"}))
    save_file({"vision_model.embeddings.patch_embedding.weight": torch.zeros(4, 3, 14, 14)}, str(vision_folder / "model.safetensors"))
    cases.append((vision_folder, "ViT-L-14", "is a transformers 'clip_vision_model' model"))
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(path.read_bytes()[:3000])
    cases.append((truncated, "ViT-L-14", "truncated or corrupt"))
    torchscript = tmp_path / "ViT-L-14.pt"
    torch.jit.script(torch.nn.Linear(2, 2)).save(str(torchscript))
    cases.append((torchscript, "ViT-L-14", "is a TorchScript archive"))
    torch.save({k: v for k, v in model.state_dict().items()}, tmp_path / "open_clip.pt")  # a plain torch.save zip is no archive
    assert isinstance(load_scoring_clip(tmp_path / "open_clip.pt", str(config)).model, open_clip.model.CLIP)
    for source, arch, fragment in cases:
        with pytest.raises(ClipFileError) as error:
            load_scoring_clip(source, arch)
        assert fragment in str(error.value) and "\n" not in str(error.value), (source, str(error.value))


# --- references -------------------------------------------------------------------------


def write_coco(root: Path, with_images=True) -> Path:
    """COCO-2017 val layout: 3 images (ids out of order), several captions each, one image uncaptioned."""
    (root / "annotations").mkdir(parents=True)
    (root / "val2017").mkdir()
    images = [{"id": 724, "file_name": "000000000724.jpg"}, {"id": 139, "file_name": "000000000139.jpg"},
              {"id": 285, "file_name": "000000000285.jpg"}, {"id": 632, "file_name": "000000000632.jpg"}]
    annotations = [{"id": 50, "image_id": 139, "caption": "second caption of 139"},
                   {"id": 12, "image_id": 139, "caption": " first caption of 139 "},
                   {"id": 7, "image_id": 724, "caption": "a stop sign"},
                   {"id": 90, "image_id": 285, "caption": "a bear"}, {"id": 91, "image_id": 285, "caption": "a brown bear"}]
    (root / "annotations" / "captions_val2017.json").write_text(json.dumps({"info": {}, "images": images, "annotations": annotations}))
    if with_images:
        for image in images:
            Image.new("RGB", (32, 24), (image["id"] % 255, 90, 40)).save(root / "val2017" / image["file_name"])
    return root


def test_coco_references_in_image_id_order_with_their_first_caption(tmp_path):
    root = write_coco(tmp_path / "coco")
    references, description = load_references(root)
    assert [(r.key, r.caption) for r in references] == [
        ("000000000139", "first caption of 139"), ("000000000285", "a bear"), ("000000000724", "a stop sign")]
    assert references[0].image == str(root / "val2017" / "000000000139.jpg") and "3 COCO references" in description
    assert [r.key for r in load_references(root / "annotations" / "captions_val2017.json", limit=2)[0]] == ["000000000139", "000000000285"]
    moved = tmp_path / "elsewhere"
    shutil.copytree(root / "val2017", moved)
    assert load_references(root / "annotations" / "captions_val2017.json", images_dir=moved)[0][0].image == str(moved / "000000000139.jpg")


def test_reference_errors_are_one_line(tmp_path):
    cases = []
    cases.append((tmp_path / "nowhere", "does not exist"))
    no_annotations = tmp_path / "coco_no_annotations"
    (no_annotations / "val2017").mkdir(parents=True)
    cases.append((no_annotations, "has no annotations/captions_val2017.json"))
    no_images = write_coco(tmp_path / "coco_no_images", with_images=False)
    (no_images / "val2017" / "000000000139.jpg").parent.mkdir(exist_ok=True)
    cases.append((no_images, "3 of the 3 reference images do not exist"))
    bad_json = tmp_path / "coco_bad"
    (bad_json / "annotations").mkdir(parents=True)
    (bad_json / "annotations" / "captions_val2017.json").write_text('{"images": [')
    cases.append((bad_json, "are not readable"))
    duplicate = tmp_path / "dup"
    for folder in ("a", "b"):
        (duplicate / folder).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(duplicate / folder / "x.png")
    (duplicate / "m.jsonl").write_text('{"image": "a/x.png", "text": "one"}\n{"image": "b/x.png", "text": "two"}\n')
    cases.append((duplicate / "m.jsonl", "share the file name 'x'"))
    cases.append((tmp_path / "nowhere.jsonl", "does not exist"))
    for source, fragment in cases:
        with pytest.raises(EvalError) as error:
            load_references(source)
        assert fragment in str(error.value) and "\n" not in str(error.value), (source, str(error.value))


# --- --generated mode end to end ---------------------------------------------------------


def test_generated_mode_scores_existing_images(tmp_path, tiny_clip, references, capsys):
    refs, _ = load_references(references)
    generated = tmp_path / "generated"
    generated.mkdir()
    for index, reference in enumerate(refs):  # sample 0: the reference itself; sample 1: the next reference (as .jpg)
        shutil.copy(reference.image, generated / f"{reference.key}_0.png")
        Image.open(refs[(index + 1) % len(refs)].image).save(generated / f"{reference.key}_1.jpg", quality=100)
    Image.new("RGB", (8, 8)).save(generated / "unrelated_0.png")  # other files are ignored
    report = main(["--data", str(references), "--generated", str(generated), "--samples-per-image", "2",
                   "--output", str(tmp_path / "out"), *clip_args(tiny_clip)])

    summary = report["summary"]
    assert (summary["n_references"], summary["n_samples"]) == (4, 8)
    rows = report["per_image"]
    assert [r["reference"] for r in rows] == ["ref0", "ref1", "ref2", "ref3"]
    for row in rows:  # an exact copy of the reference has CLIP-I 1
        assert math.isclose(row["clip_i_samples"][0], 1.0, abs_tol=1e-6)
        assert row["clip_i_samples"][1] < 0.999
        assert math.isclose(row["clip_i"], sum(row["clip_i_samples"]) / 2, abs_tol=1e-9)
        assert math.isclose(row["clip_i_clipscore"], 2.5 * sum(max(v, 0) for v in row["clip_i_samples"]) / 2, abs_tol=1e-9)

    # CLIP-T recomputed from the in-memory model, open_clip's tokenize and the reference pixels
    _, _, model = tiny_clip
    clip = load_scoring_clip(tiny_clip[0], str(tiny_clip[1]))
    with torch.no_grad():
        image = model.encode_image(clip.pixels(Image.open(refs[2].image))[None])
        text = model.encode_text(open_clip.tokenize([refs[2].caption]))
    assert math.isclose(rows[2]["clip_t_samples"][0], float(cosine(image, text)[0]), abs_tol=1e-5)
    all_t = [v for r in rows for v in r["clip_t_samples"]]
    assert math.isclose(summary["clip_t"]["cosine"], sum(all_t) / 8, abs_tol=1e-9)
    assert math.isclose(summary["clip_t"]["clipscore"], 2.5 * sum(max(v, 0) for v in all_t) / 8, abs_tol=1e-9)

    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["summary"] == summary and saved["protocol"]["mode"] == "scored existing images"
    with (tmp_path / "out" / "per_image.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == 4 and math.isclose(float(table[1]["clip_t"]), rows[1]["clip_t"], abs_tol=1e-6)
    out = capsys.readouterr().out
    assert "CLIP-I" in out and "CLIP-T" in out and "n = 4 reference images x 2 samples = 8 images" in out
    assert f"{summary['clip_i']['cosine']:.4f}" in out and f"{summary['clip_t']['clipscore']:.4f}" in out

    # one sample missing: a one-line error that names it
    (generated / "ref2_1.jpg").unlink()
    with pytest.raises(EvalError) as error:
        main(["--data", str(references), "--generated", str(generated), "--samples-per-image", "2",
              "--output", str(tmp_path / "out2"), *clip_args(tiny_clip)])
    assert "lacks 1 of 8 images (first: ref2_1.png for reference 'ref2')" in str(error.value)
    assert "\n" not in str(error.value)
    (generated / "ref2_1.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    with pytest.raises(EvalError, match="ref2_1.png' cannot be used \\(broken image\\)"):
        main(["--data", str(references), "--generated", str(generated), "--samples-per-image", "2",
              "--output", str(tmp_path / "out2"), *clip_args(tiny_clip)])


# --- generation mode end to end (tiny SD1.5 layout, random weights) ------------------------


@pytest.fixture(scope="module")
def generator_files(tmp_path_factory):
    """A scaled-down SD1.5 diffusers folder, an OpenCLIP image encoder file and an exported adapter."""
    from training.adapter import IPAdapterModel
    from training.run_files import export_adapter

    root = tmp_path_factory.mktemp("generator")
    sd15, encoder, frozen = write_model_files(root)
    model = IPAdapterModel(frozen.unet, frozen.image_encoder.embed_dim)
    with torch.no_grad():
        for parameter in model.trainable_parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(0)))
    adapter = export_adapter(model, root / "adapter.safetensors", 1, "config: test", dtype="fp32")
    return sd15, encoder, adapter


def test_generation_mode_end_to_end(tmp_path, tiny_clip, references, generator_files):
    sd15, encoder, adapter = generator_files
    out = tmp_path / "out"
    common = ["--data", str(references), "--limit", "2", "--samples-per-image", "2", "--base", str(sd15),
              "--adapter", str(adapter), "--image-encoder", str(encoder), "--steps", "2", "--resolution", "64",
              "--device", "cpu", *clip_args(tiny_clip)]
    args = common + ["--output", str(out)]
    report = main(args)
    files = sorted(p.name for p in (out / "images").glob("*.png"))
    assert files == ["ref0_0.png", "ref0_1.png", "ref1_0.png", "ref1_1.png"]
    first, second = (torch.tensor(list(Image.open(out / "images" / f).getdata()), dtype=torch.float32) for f in files[:2])
    assert Image.open(out / "images" / files[0]).size == (64, 64)
    assert (first - second).abs().mean() > 1  # two samples of one prompt draw different noise
    protocol = report["protocol"]
    assert (protocol["steps"], protocol["guidance"], protocol["scale"], protocol["prompt"], protocol["sampler"]) == (2, 7.5, 1.0, "empty", "DDIM")
    assert (report["summary"]["n_references"], report["summary"]["n_samples"]) == (2, 4)
    assert all(-1 <= v <= 1 for row in report["per_image"] for v in row["clip_i_samples"] + row["clip_t_samples"])

    # scoring the written folder with --generated gives the same report numbers
    again = main(["--data", str(references), "--limit", "2", "--samples-per-image", "2", "--generated", str(out / "images"),
                  "--output", str(tmp_path / "rescored"), *clip_args(tiny_clip)])
    assert again["summary"] == report["summary"]

    # the images do not depend on the batching; a caption prompt changes them
    def pixels(folder):
        return torch.stack([torch.tensor(list(Image.open(folder / "images" / f).getdata()), dtype=torch.float32) for f in files])

    one_by_one = tmp_path / "one_by_one"
    main(common + ["--output", str(one_by_one), "--generation-batch", "1"])
    assert (pixels(one_by_one) - pixels(out)).abs().max() <= 2  # float rounding of other batch shapes, then 8 bits
    captioned = tmp_path / "captioned"
    main(common + ["--output", str(captioned), "--prompt", "caption"])
    assert (pixels(captioned) - pixels(out)).abs().mean() > 1

    # a rerun keeps finished images; other settings in the same folder are refused
    stamp = (out / "images" / files[0]).stat().st_mtime_ns
    main(args)
    assert (out / "images" / files[0]).stat().st_mtime_ns == stamp
    with pytest.raises(EvalError, match="holds images generated with other settings"):
        main(args + ["--scale", "0.5"])


def test_generation_input_errors(tmp_path, tiny_clip, references, generator_files):
    sd15, encoder, adapter = generator_files
    base = ["--data", str(references), "--limit", "1", "--output", str(tmp_path), *clip_args(tiny_clip)]
    with pytest.raises(EvalError, match="--adapter, --image-encoder not given"):
        main(base + ["--base", str(sd15)])
    with pytest.raises(EvalError, match="leave out --base"):
        main(base + ["--generated", str(tmp_path), "--base", str(sd15)])
    with pytest.raises(EvalError, match="is not a device"):
        main(base + ["--generated", str(tmp_path), "--device", "gpu0"])
    from ipadapter.adapter_file import AdapterFormatError
    from training.models import ModelFileError

    with pytest.raises(AdapterFormatError, match="does not exist"):
        main(base + ["--base", str(sd15), "--adapter", str(tmp_path / "none.bin"), "--image-encoder", str(encoder)])
    with pytest.raises(ModelFileError, match="image encoder .* does not exist"):
        main(base + ["--base", str(sd15), "--adapter", str(adapter), "--image-encoder", str(tmp_path / "none.safetensors")])


def test_cli_prints_one_line_errors(tmp_path, tiny_clip):
    result = subprocess.run([sys.executable, "-m", "training.eval", "--data", str(write_coco(tmp_path / "coco")),
                             "--generated", str(tmp_path / "nothing"), *clip_args(tiny_clip)],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: generated images folder '{tmp_path / 'nothing'}' does not exist; expected <reference name>_<k>.png files"]


def trained_looking_export(frozen, variant: str, path: Path) -> Path:
    """An adapter of ``variant`` for ``frozen``'s UNet and encoder, its weights moved off their initialisation, exported."""
    from training.adapter import IPAdapterModel
    from training.run_files import export_adapter
    from training.variants import adapter_spec

    tower = frozen.image_encoder
    model = IPAdapterModel(frozen.unet, spec=adapter_spec(variant, None, tower.embed_dim, tower.hidden_width, frozen.unet))
    with torch.no_grad():
        for parameter in model.trainable_parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(0)))
    return export_adapter(model, path, 1, "config: test", dtype="fp32")


def first_image(folder: Path) -> torch.Tensor:
    return torch.tensor(list(Image.open(folder / "images" / "ref0_0.png").getdata()), dtype=torch.float32)


def test_generation_with_a_plus_adapter_feeds_hidden_states(tmp_path, tiny_clip, references):
    sd15, encoder, frozen = write_model_files(tmp_path / "models")
    adapter = trained_looking_export(frozen, "plus", tmp_path / "ip-adapter-plus_sd15.safetensors")
    common = ["--data", str(references), "--limit", "1", "--samples-per-image", "1", "--base", str(sd15),
              "--adapter", str(adapter), "--image-encoder", str(encoder), "--steps", "2", "--resolution", "64",
              "--device", "cpu", *clip_args(tiny_clip)]
    main(common + ["--output", str(tmp_path / "plus")])
    main(common + ["--output", str(tmp_path / "text-only"), "--scale", "0"])
    # the plus adapter's image prompt changes the image
    assert (first_image(tmp_path / "plus") - first_image(tmp_path / "text-only")).abs().mean() > 1


def test_generation_for_sdxl_with_an_sdxl_adapter_and_the_other_family_refused(tmp_path, tiny_clip, references):
    from ipadapter.adapter_file import AdapterFormatError
    from training.adapter import IPAdapterModel
    from ipadapter.registry.families import SD15
    from training.models import build_embedded_models
    from training.run_files import export_adapter

    sdxl, encoder, frozen = write_model_files(tmp_path / "models", family="sdxl")
    adapter = trained_looking_export(frozen, "base", tmp_path / "ip-adapter_sdxl_vit-h.safetensors")
    common = ["--data", str(references), "--limit", "1", "--samples-per-image", "1", "--base", str(sdxl),
              "--image-encoder", str(encoder), "--steps", "2", "--resolution", "64", "--device", "cpu", *clip_args(tiny_clip)]
    report = main(common + ["--adapter", str(adapter), "--output", str(tmp_path / "image")])
    assert report["protocol"]["base"] == str(sdxl) and report["protocol"]["family"] == "sdxl"
    main(common + ["--adapter", str(adapter), "--output", str(tmp_path / "text-only"), "--scale", "0"])
    # the SDXL adapter's image prompt changes the image
    assert (first_image(tmp_path / "image") - first_image(tmp_path / "text-only")).abs().mean() > 1

    sd15 = build_embedded_models(SD15)
    sd15_adapter = export_adapter(IPAdapterModel(sd15.unet, sd15.image_encoder.embed_dim), tmp_path / "sd15.safetensors", 0, "")
    with pytest.raises(AdapterFormatError) as refused:
        main(common + ["--adapter", str(sd15_adapter), "--output", str(tmp_path / "wrong")])
    assert "\n" not in str(refused.value) and "SD1.5" in str(refused.value) and "SDXL" in str(refused.value)
