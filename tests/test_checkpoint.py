import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from devtools.adapter_factory import random_adapter
from ipadapter.registry.families import SD15, SDXL
from ipadapter.adapter_file import (
    AdapterFormatError,
    IPAdapterCheckpoint,
    check_encoder,
    load_adapter,
    save_adapter,
)


def write_bin(path: Path, nested: dict) -> Path:
    torch.save(nested, path)
    return path


def write_flat(path: Path, nested: dict, prefixes=("image_proj", "ip_adapter")) -> Path:
    flat = {f"{prefixes[0]}.{k}": v for k, v in nested["image_proj"].items()}
    flat.update({f"{prefixes[1]}.{k}": v for k, v in nested["ip_adapter"].items()})
    save_file(flat, str(path))
    return path


def assert_one_line(error: pytest.ExceptionInfo, *fragments: str):
    message = str(error.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


@pytest.mark.parametrize(
    "variant, tokens, encoder_input, encoder_width",
    [("base", 4, "image_embeds", 1024), ("plus", 16, "penultimate", 1280), ("full-face", None, "penultimate", 1280)],
)
def test_detects_variant_from_tensors(tmp_path, variant, tokens, encoder_input, encoder_width):
    path = write_bin(tmp_path / "adapter_named_misleadingly_plus_sdxl.bin", random_adapter(variant))
    checkpoint = load_adapter(path)
    spec = checkpoint.spec
    assert (spec.variant, spec.num_tokens, spec.encoder_input, spec.encoder_width) == (
        variant, tokens, encoder_input, encoder_width)
    assert spec.cross_attention_dim == 768 and spec.base_width == 320
    assert spec.encoder_name == "OpenCLIP ViT-H/14"


def test_vit_bigg_base_adapter_is_detected(tmp_path):
    path = write_bin(tmp_path / "a.bin", random_adapter("base", encoder_width=1280))
    spec = load_adapter(path).spec
    assert spec.encoder_width == 1280 and spec.encoder_name == "OpenCLIP ViT-bigG/14"


def test_round_trip_bin_to_safetensors_and_back(tmp_path):
    original = random_adapter("base", seed=3)
    bin_path = write_bin(tmp_path / "ip-adapter_sd15.bin", original)
    checkpoint = load_adapter(bin_path)
    st_path = save_adapter(checkpoint, tmp_path / "out.safetensors", dtype=None, metadata={"step": "7"})

    flat = load_file(str(st_path))
    assert len(flat) == 36
    assert sum(k.startswith("image_proj.") for k in flat) == 4
    assert "ip_adapter.31.to_v_ip.weight" in flat and "image_proj.proj.weight" in flat

    reread = load_adapter(st_path)
    assert reread.metadata["step"] == "7"
    back = save_adapter(reread, tmp_path / "back.bin", dtype=None)
    nested = torch.load(back, weights_only=True)
    assert set(nested) == {"image_proj", "ip_adapter"}
    for group in ("image_proj", "ip_adapter"):
        assert set(nested[group]) == set(original[group])
        for key, value in original[group].items():
            assert torch.equal(nested[group][key], value), key


def test_save_defaults_to_fp16_like_the_released_files(tmp_path):
    checkpoint = IPAdapterCheckpoint.from_state_dicts(**random_adapter("base"))
    path = save_adapter(checkpoint, tmp_path / "a.safetensors")
    flat = load_file(str(path))
    assert all(t.dtype == torch.float16 for t in flat.values())
    assert checkpoint.num_parameters() == 22_319_616
    assert 44_000_000 < path.stat().st_size < 45_000_000


@pytest.mark.parametrize("variant", ["base", "plus", "full-face"])
def test_projection_loads_official_keys_strictly(variant):
    checkpoint = IPAdapterCheckpoint.from_state_dicts(**random_adapter(variant))
    projection = checkpoint.build_projection()
    features = torch.randn(2, 1024) if variant == "base" else torch.randn(2, 257, 1280)
    tokens = projection(features)
    expected = {"base": (2, 4, 768), "plus": (2, 16, 768), "full-face": (2, 257, 768)}[variant]
    assert tokens.shape == expected
    assert torch.isfinite(tokens).all()


def test_adapter_modules_prefix_and_reference_training_state_are_tolerated(tmp_path):
    nested = random_adapter("base")
    path = write_flat(tmp_path / "trained.safetensors", nested, ("image_proj_model", "adapter_modules"))
    assert load_adapter(path).spec.variant == "base"
    state = {f"adapter_modules.{k}": v for k, v in nested["ip_adapter"].items()}
    state.update({f"image_proj_model.{k}": v for k, v in nested["image_proj"].items()})
    state["unet.conv_in.weight"] = torch.zeros(320, 4, 3, 3)
    assert load_adapter(write_bin(tmp_path / "pytorch_model.bin", state)).spec.variant == "base"


def test_scaled_down_layout_needs_opt_in(tmp_path):
    path = write_bin(tmp_path / "toy.bin", random_adapter("base", base_width=32))
    with pytest.raises(AdapterFormatError) as error:
        load_adapter(path)
    assert_one_line(error, "toy.bin", "ip_adapter.1.to_k_ip.weight is [32, 768]", "expected [320, 768]")
    assert load_adapter(path, base_width=None).spec.base_width == 32


def test_refuses_wrong_layer_shape(tmp_path):
    nested = random_adapter("base")
    nested["ip_adapter"]["31.to_k_ip.weight"] = torch.zeros(640, 768)
    with pytest.raises(AdapterFormatError) as error:
        load_adapter(write_flat(tmp_path / "bad.safetensors", nested))
    assert_one_line(error, "bad.safetensors", "ip_adapter.31.to_k_ip.weight is [640, 768]", "expected [1280, 768]", "mid_block")


def test_refuses_missing_layer(tmp_path):
    nested = random_adapter("base")
    del nested["ip_adapter"]["31.to_v_ip.weight"]
    with pytest.raises(AdapterFormatError) as error:
        load_adapter(write_bin(tmp_path / "short.bin", nested))
    assert_one_line(error, "short.bin", "layer 31 lacks to_v_ip.weight", "expected to_k_ip.weight, to_v_ip.weight per layer")


def test_refuses_sdxl_adapter_where_sd15_is_expected(tmp_path):
    nested = random_adapter("base", encoder_width=1280, family="sdxl")
    path = write_flat(tmp_path / "ip-adapter_sdxl.safetensors", nested)
    with pytest.raises(AdapterFormatError) as error:
        load_adapter(path, architecture=SD15)
    assert_one_line(error, "ip-adapter_sdxl.safetensors", "is an SDXL adapter (70 layers", "2048",
                    "expected an SD1.5 adapter (16 layers, 768 wide)")
    with pytest.raises(AdapterFormatError) as error:
        load_adapter(write_flat(tmp_path / "ip-adapter_sd15.safetensors", random_adapter("base")), architecture=SDXL)
    assert_one_line(error, "is an SD1.5 adapter (16 layers", "expected an SDXL adapter (70 layers, 2048 wide)")


@pytest.mark.parametrize(
    "variant, encoder_width, tokens, encoder_name",
    [("base", 1280, 4, "OpenCLIP ViT-bigG/14"), ("base", 1024, 4, "OpenCLIP ViT-H/14"), ("plus", 1280, 16, "OpenCLIP ViT-H/14")],
)
def test_detects_released_sdxl_adapters(tmp_path, variant, encoder_width, tokens, encoder_name):
    nested = random_adapter(variant, encoder_width=encoder_width, family="sdxl", dtype=torch.float16)
    spec = load_adapter(write_flat(tmp_path / "a.safetensors", nested)).spec
    assert spec.architecture is SDXL and spec.variant == variant and spec.num_tokens == tokens
    assert spec.cross_attention_dim == 2048 and spec.base_width == 320 and spec.encoder_name == encoder_name
    if variant == "plus":  # the authors' SDXL plus Resampler: width 1280, 20 heads of 64
        assert spec.resampler == {"dim": 1280, "depth": 4, "dim_head": 64, "heads": 20, "ff_mult": 4}
        projection = IPAdapterCheckpoint.from_state_dicts(**nested).build_projection()
        assert projection(torch.randn(1, 257, 1280)).shape == (1, 16, 2048)


def test_refuses_sdxl_layers_with_sd15_token_width(tmp_path):
    nested = random_adapter("base", cross=768, family="sdxl")
    with pytest.raises(AdapterFormatError) as error:
        load_adapter(write_bin(tmp_path / "odd.bin", nested))
    assert_one_line(error, "odd.bin", "makes image tokens 768 wide", "expected 2048, the SDXL cross-attention width")


def test_refuses_faceid_adapter(tmp_path):
    nested = random_adapter("base")
    nested["image_proj"] = {
        "proj.0.weight": torch.zeros(1024, 512), "proj.0.bias": torch.zeros(1024),
        "proj.2.weight": torch.zeros(3072, 1024), "proj.2.bias": torch.zeros(3072),
        "norm.weight": torch.ones(768), "norm.bias": torch.zeros(768),
    }
    with pytest.raises(AdapterFormatError) as error:
        load_adapter(write_bin(tmp_path / "faceid.bin", nested))
    assert_one_line(error, "faceid.bin", "FaceID")


def test_refuses_encoder_of_another_width():
    base = IPAdapterCheckpoint.from_state_dicts(**random_adapter("base"), source="ip-adapter_sd15.bin")
    check_encoder(base.spec, 1024, 1280, base.source, "ViT-H/14")  # the right pair
    with pytest.raises(AdapterFormatError) as error:
        check_encoder(base.spec, 1280, 1664, base.source, "ViT-bigG/14")
    assert_one_line(error, "ip-adapter_sd15.bin", "ViT-H/14 image embeddings of width 1024", "ViT-bigG/14) gives 1280")

    plus = IPAdapterCheckpoint.from_state_dicts(**random_adapter("plus"), source="plus.bin")
    with pytest.raises(AdapterFormatError) as error:
        check_encoder(plus.spec, 1024, 1664, plus.source, "ViT-bigG/14")
    assert_one_line(error, "plus.bin", "hidden states of width 1280", "gives 1664")


def test_refuses_truncated_files(tmp_path):
    checkpoint = IPAdapterCheckpoint.from_state_dicts(**random_adapter("base"))
    for name in ("cut.safetensors", "cut.bin"):
        path = save_adapter(checkpoint, tmp_path / name)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        with pytest.raises(AdapterFormatError) as error:
            load_adapter(path)
        assert_one_line(error, name, "truncated or corrupt")


class RunsCode:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_refuses_pickle_that_runs_code(tmp_path):
    marker = tmp_path / "pwned"
    nested = random_adapter("base")
    nested["image_proj"]["payload"] = RunsCode(str(marker))
    path = tmp_path / "evil.bin"
    torch.save(nested, path)
    with pytest.raises(AdapterFormatError) as error:
        load_adapter(path)
    assert_one_line(error, "evil.bin", "refused")
    assert not marker.exists()


def test_refuses_other_files(tmp_path):
    with pytest.raises(AdapterFormatError) as error:
        load_adapter(tmp_path / "nope.safetensors")
    assert_one_line(error, "nope.safetensors", "does not exist")

    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2)}, str(tmp_path / "sd15.safetensors"))
    with pytest.raises(AdapterFormatError) as error:
        load_adapter(tmp_path / "sd15.safetensors")
    assert_one_line(error, "sd15.safetensors", "not an IP-Adapter checkpoint", "model.diffusion_model")


def test_failed_save_keeps_the_existing_file(tmp_path):
    good = IPAdapterCheckpoint.from_state_dicts(**random_adapter("base"))
    path = save_adapter(good, tmp_path / "keep.safetensors")
    before = path.read_bytes()
    broken = IPAdapterCheckpoint.from_state_dicts(**random_adapter("base"))
    broken.ip_adapter["1.to_k_ip.weight"] = "not a tensor"
    with pytest.raises(Exception):
        save_adapter(broken, path, dtype=None)  # fails while writing
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["keep.safetensors"]


def test_atomic_path_replaces_a_file_only_when_the_write_completes(tmp_path):
    from ipadapter.files import atomic_path, write_text_atomic

    path = write_text_atomic(tmp_path / "sub" / "report.json", "first")
    assert path.read_text() == "first"
    assert path.stat().st_mode & 0o777 == 0o644  # readable by others (a ComfyUI run as another user), not mkstemp's 0600
    with pytest.raises(RuntimeError):
        with atomic_path(path) as temporary:
            temporary.write_text("half")
            raise RuntimeError("killed while writing")
    assert path.read_text() == "first"
    assert [p.name for p in path.parent.iterdir()] == ["report.json"]  # no temporary file left behind
