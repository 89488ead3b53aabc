"""Files found by what they hold: renamed adapters and encoders in a models folder and an extra path, every preset
of SD1.5 and SDXL resolved, the released names winning ties, and one-line errors saying what each file is."""
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from devtools.adapter_factory import random_adapter, random_faceid_adapter
from devtools.comfy_import import REPO_ROOT
from ipadapter import model_scan
from ipadapter.encoder import build_vision_tower
from ipadapter.registry.families import FLUX, SD15, SDXL

# the presets of each family with the variant, encoder width and a name that says what a name must say
FILES = {
    "sd15": [("adapter-v2.bin", "base", 1024), ("my light one.safetensors", "base", 1024),
             ("sub/plus.safetensors", "plus", 1280), ("face/plus FACE.safetensors", "plus", 1280),
             ("ff.safetensors", "full-face", 1280), ("bigg.safetensors", "base", 1280)],
    "sdxl": [("xl/a.safetensors", "base", 1024), ("xl/b.safetensors", "base", 1280), ("xl/c.safetensors", "plus", 1280),
             ("xl/c-face.safetensors", "plus", 1280)],
}
EXPECTED = {
    (SD15, "standard"): "adapter-v2.bin", (SD15, "light"): "my light one.safetensors",
    (SD15, "plus"): "sub/plus.safetensors", (SD15, "plus-face"): "face/plus FACE.safetensors",
    (SD15, "full-face"): "ff.safetensors", (SD15, "vit-bigg"): "bigg.safetensors",
    (SDXL, "standard"): "xl/a.safetensors", (SDXL, "vit-bigg"): "xl/b.safetensors", (SDXL, "plus"): "xl/c.safetensors",
    (SDXL, "plus-face"): "xl/c-face.safetensors",
}


def write_flat_adapter(path, seed, variant="base", family="sd15", encoder_width=None):
    """A scaled-down adapter (layers 8 channels per width step, the real context and encoder widths): a torch pickle
    for .bin, else safetensors."""
    nested = random_adapter(variant, base_width=8, seed=seed, family=family, encoder_width=encoder_width)
    if path.suffix == ".bin":
        torch.save(nested, path)
    else:
        save_file({f"{group}.{key}": value for group, part in nested.items() for key, value in part.items()}, str(path))


def write_encoder(path, kind):
    """A scaled-down tower standing for ViT-H/14 (1024-d output) or ViT-bigG/14 (1280-d) under any name."""
    embed = {"vit-h": 1024, "vit-bigg": 1280}[kind]
    tower = build_vision_tower("ViT-H-14", width=64, layers=2, head_width=32, image_size=28, embed_dim=embed)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tower.visual.state_dict().items()}, str(path))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("ComfyUI")
    main, extra = root / "models" / "ipadapter", root / "extra" / "ipadapter"
    for family, files in FILES.items():
        for index, (name, variant, width) in enumerate(files):
            path = (extra if index % 2 else main) / name  # half of them in a folder of extra_model_paths.yaml
            path.parent.mkdir(parents=True, exist_ok=True)
            write_flat_adapter(path, seed=index, variant=variant, family=family, encoder_width=width)
    encoders = root / "models" / "clip_vision"
    write_encoder(encoders / "vit-h-encoder.safetensors", "vit-h")
    write_encoder(encoders / "model.safetensors", "vit-bigg")
    (encoders / "notes.bin").write_bytes(b"not weights")
    return root, [str(main), str(extra)], [str(encoders)]


@pytest.mark.parametrize("family, preset", list(EXPECTED), ids=[f"{f.id}-{p}" for f, p in EXPECTED])
def test_every_preset_resolves_by_content(folders, family, preset):
    _, adapter_folders, encoder_folders = folders
    adapter = model_scan.pick_adapter(family, preset, model_scan.files_in(adapter_folders), adapter_folders)
    assert adapter.name == EXPECTED[(family, preset)]
    encoder = model_scan.pick_encoder(model_scan.PRESETS[preset][1], adapter,
                                      model_scan.files_in(encoder_folders), encoder_folders)
    assert encoder.name == {"vit-h": "vit-h-encoder.safetensors", "vit-bigg": "model.safetensors"}[adapter.encoder]


def test_released_names_win_ties(tmp_path):
    for name in ("zz-renamed.safetensors", "ip-adapter_sd15.safetensors", "aa-renamed.safetensors"):
        write_flat_adapter(tmp_path / name, seed=0, variant="base", family="sd15")
    assert model_scan.pick_adapter(SD15, "standard", model_scan.files_in([str(tmp_path)]), []).name == \
        "ip-adapter_sd15.safetensors"


def test_nothing_fitting_is_one_line_saying_what_each_file_is(folders, tmp_path):
    _, adapter_folders, _ = folders
    with pytest.raises(model_scan.NotFound) as error:
        model_scan.pick_adapter(FLUX, "flux-xlabs", model_scan.files_in(adapter_folders), adapter_folders)
    message = str(error.value)
    assert "\n" not in message and "is an Flux.1 xlabs adapter" in message
    assert "adapter-v2.bin is SD1.5 base (4 tokens, OpenCLIP ViT-H/14 image_embeds 1024-d)" in message
    # a missing encoder: the table of what the clip_vision folder holds
    write_encoder(tmp_path / "clip_vision" / "only-bigg.safetensors", "vit-bigg")
    (tmp_path / "clip_vision" / "notes.bin").write_bytes(b"x")
    adapter = model_scan.pick_adapter(SD15, "standard", model_scan.files_in(adapter_folders), adapter_folders)
    with pytest.raises(model_scan.NotFound) as error:
        model_scan.pick_encoder("vit-h", adapter, model_scan.files_in([str(tmp_path / "clip_vision")]),
                                [str(tmp_path / "clip_vision")])
    message = str(error.value)
    assert "\n" not in message and "needs OpenCLIP ViT-H/14" in message
    assert "only-bigg.safetensors is a scaled-down OpenCLIP ViT-bigG/14" in message and "notes.bin is not readable as weights" in message


def test_name_only_presets_need_their_word(tmp_path):
    write_flat_adapter(tmp_path / "renamed.safetensors", seed=0, variant="base", family="sd15")
    files = model_scan.files_in([str(tmp_path)])
    assert model_scan.pick_adapter(SD15, "standard", files, []).name == "renamed.safetensors"
    with pytest.raises(model_scan.NotFound, match="its name must say 'light'"):
        model_scan.pick_adapter(SD15, "light", files, [])


def test_classifications_are_cached_by_path_size_and_time(tmp_path):
    path = tmp_path / "a.safetensors"
    write_flat_adapter(path, seed=0, variant="base", family="sd15")
    first = model_scan.classify(path)
    assert model_scan.classify(path) is first
    write_flat_adapter(path, seed=0, variant="plus", family="sd15", encoder_width=1280)
    assert model_scan.classify(path).description.startswith("SD1.5 plus")


def test_models_command_prints_the_table(folders):
    root, _, _ = folders
    (root / "extra_model_paths.yaml").write_text(f"mine:\n  base_path: {root / 'extra'}\n  ipadapter: ipadapter\n")
    result = subprocess.run([sys.executable, "-m", "ipadapter", "models", str(root)], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [cell.strip() for cell in lines[0].split(" | ")] == ["file", "what it is", "needs", "presets", "encoder present"]
    row = next(line for line in lines if "my light one.safetensors" in line)  # from the extra path
    assert "SD1.5 base" in row and "light" in row and "standard" in row and row.rstrip().endswith("yes")
    assert any("clip_vision/model.safetensors" in line and "ViT-bigG/14" in line for line in lines)


def write_faceid(path, variant, seed=0, family="sd15"):
    nested = random_faceid_adapter(variant, base_width=8, seed=seed, family=family, clip_width=1280)
    save_file({f"{group}.{key}": value for group, part in nested.items() for key, value in part.items()}, str(path))


def test_faceid_adapters_are_picked_by_content(tmp_path):
    """"face" in faceid is not plus-face's word; plusv2 (faceid-plus's tensors) needs its word, plus v1 a name
    without it; the other FaceID presets go by their tensors."""
    write_faceid(tmp_path / "my faceid.safetensors", "faceid")
    write_faceid(tmp_path / "portrait.safetensors", "faceid-portrait", seed=1)
    write_faceid(tmp_path / "face-plus-v1.safetensors", "faceid-plus", seed=2)
    write_faceid(tmp_path / "renamed plusv2.safetensors", "faceid-plus", seed=3)
    write_faceid(tmp_path / "xl-unnorm.safetensors", "faceid-portrait-unnorm", seed=4, family="sdxl")
    write_flat_adapter(tmp_path / "plus FACE.safetensors", seed=5, variant="plus", family="sd15", encoder_width=1280)
    files = model_scan.files_in([str(tmp_path)])
    picked = {preset: model_scan.pick_adapter(SD15, preset, files, []).name
              for preset in ("faceid", "faceid-plus", "faceid-plusv2", "faceid-portrait", "plus-face")}
    assert picked == {"faceid": "my faceid.safetensors", "faceid-plus": "face-plus-v1.safetensors",
                      "faceid-plusv2": "renamed plusv2.safetensors", "faceid-portrait": "portrait.safetensors",
                      "plus-face": "plus FACE.safetensors"}
    assert model_scan.pick_adapter(SDXL, "faceid-portrait-unnorm", files, []).name == "xl-unnorm.safetensors"
    assert "LoRA rank 4" in model_scan.classify(tmp_path / "my faceid.safetensors").description
    (tmp_path / "renamed plusv2.safetensors").unlink()
    with pytest.raises(model_scan.NotFound) as error:
        model_scan.pick_adapter(SD15, "faceid-plusv2", model_scan.files_in([str(tmp_path)]), [])
    message = str(error.value)
    assert "\n" not in message and "its name must say 'plusv2'" in message
    assert "face-plus-v1.safetensors is SD1.5 faceid-plus" in message
