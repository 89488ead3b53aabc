"""``python -m ipadapter convert IN OUT``: a .safetensors copy of a torch pickle.

Each case a user meets runs the command in a subprocess as a user runs it; the variants of a
case call ``convert_weights``, the command's whole work, in-process (a subprocess loads torch: ~2 s).
"""
from __future__ import annotations

import builtins
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from devtools.adapter_factory import random_adapter
from devtools.comfy_import import REPO_ROOT
from ipadapter import convert as convert_module
from ipadapter.convert import ConvertError, convert_weights, describe_adapter


def run_convert(*argv) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ipadapter", "convert", *map(str, argv)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120, check=False)


def assert_refused(result: subprocess.CompletedProcess, *words: str) -> None:
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr
    for word in words:
        assert word in result.stderr


def assert_bits_equal(found: torch.Tensor, expected: torch.Tensor) -> None:
    assert found.dtype == expected.dtype and found.shape == expected.shape
    as_bytes = [t.contiguous().reshape(-1).view(torch.uint8) for t in (found, expected)]
    assert torch.equal(*as_bytes)


def test_nested_adapter_round_trips_bit_exactly(tmp_path):
    nested = random_adapter("base", base_width=8, encoder_width=32, seed=1, dtype=torch.float16)
    nested["image_proj"]["proj.bias"][0] = float("nan")  # compared as bits, not values
    torch.save(nested, tmp_path / "ip-adapter.bin")

    result = run_convert(tmp_path / "ip-adapter.bin", tmp_path / "ip-adapter.safetensors", "--check")

    assert result.returncode == 0, result.stderr
    assert "checked: every tensor reads back bit for bit" in result.stdout
    assert "IP-Adapter: SD1.5 base (4 tokens" in result.stdout
    written = load_file(tmp_path / "ip-adapter.safetensors")
    expected = {f"{group}.{key}": t for group, tensors in nested.items() for key, t in tensors.items()}
    assert set(written) == set(expected) and "ip_adapter.1.to_k_ip.weight" in written
    for key, tensor in expected.items():
        assert_bits_equal(written[key], tensor)  # float16 kept


def test_a_truncated_pickle_is_refused_and_leaves_out_as_it_was(tmp_path):
    torch.save(random_adapter("base", base_width=8, encoder_width=32), tmp_path / "whole.bin")
    data = (tmp_path / "whole.bin").read_bytes()
    (tmp_path / "cut.bin").write_bytes(data[: len(data) // 2])
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "model.safetensors").write_bytes(b"the previous file")

    result = run_convert(tmp_path / "cut.bin", tmp_path / "out" / "model.safetensors")

    assert_refused(result, "'cut.bin'", "truncated")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["model.safetensors"]  # no temporary left behind
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == b"the previous file"


def test_a_truncated_pickle_writes_no_output(tmp_path):
    torch.save({"weight": torch.zeros(1000)}, tmp_path / "whole.pt", _use_new_zipfile_serialization=False)
    data = (tmp_path / "whole.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])

    with pytest.raises(ConvertError, match="truncated"):
        convert_weights(tmp_path / "cut.pt", tmp_path / "model.safetensors")

    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.pt", "whole.pt"]


class RunsACommand:
    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return os.system, (f"touch '{self.sentinel}'",)


class OpensAFile(RunsACommand):
    def __reduce__(self):
        return builtins.open, (str(self.sentinel), "w")


def test_a_pickle_that_asks_to_run_code_is_refused_without_running_it(tmp_path):
    torch.save({"weight": torch.zeros(2), "hook": RunsACommand(tmp_path / "ran")}, tmp_path / "hook.bin")
    (tmp_path / "hook.safetensors").write_bytes(b"the previous file")

    result = run_convert(tmp_path / "hook.bin", tmp_path / "hook.safetensors")

    assert_refused(result, "'hook.bin'", "refused")
    assert not (tmp_path / "ran").exists()
    assert (tmp_path / "hook.safetensors").read_bytes() == b"the previous file"
    # the payload is real: an unrestricted load runs it
    torch.load(tmp_path / "hook.bin", weights_only=False)
    assert (tmp_path / "ran").exists()


def save_legacy_torch(tree, path):
    torch.save(tree, path, _use_new_zipfile_serialization=False)


def save_plain_pickle(tree, path):
    with open(path, "wb") as handle:
        pickle.dump(tree, handle)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch's note on a plain pickle
@pytest.mark.parametrize("save", [torch.save, save_legacy_torch, save_plain_pickle])
@pytest.mark.parametrize("payload", [RunsACommand, OpensAFile])
def test_no_pickle_format_runs_the_code_it_asks_for(tmp_path, save, payload):
    save({"weight": torch.zeros(2), "hook": payload(tmp_path / "ran")}, tmp_path / "hook.bin")

    with pytest.raises(ConvertError, match="refused"):
        convert_weights(tmp_path / "hook.bin", tmp_path / "hook.safetensors")

    assert not (tmp_path / "ran").exists() and not (tmp_path / "hook.safetensors").exists()


def test_an_output_that_is_not_safetensors_is_refused(tmp_path):
    torch.save({"weight": torch.zeros(2)}, tmp_path / "model.bin")

    result = run_convert(tmp_path / "model.bin", tmp_path / "model.pt")

    assert_refused(result, "'" + str(tmp_path / "model.pt") + "'", ".safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.bin"]


def test_dtype_fp16_casts_the_floating_tensors_only(tmp_path):
    tree = {"weight": torch.randn(4, 3, dtype=torch.float64), "bf16": torch.randn(2, dtype=torch.bfloat16),
            "steps": torch.arange(5), "mask": torch.tensor([True, False])}
    torch.save(tree, tmp_path / "model.pth")

    result = run_convert(tmp_path / "model.pth", tmp_path / "model.safetensors", "--dtype", "fp16", "--check")

    assert result.returncode == 0, result.stderr
    written = load_file(tmp_path / "model.safetensors")
    assert {key: t.dtype for key, t in written.items()} == {
        "weight": torch.float16, "bf16": torch.float16, "steps": torch.int64, "mask": torch.bool}
    assert_bits_equal(written["weight"], tree["weight"].half())
    assert torch.equal(written["steps"], tree["steps"]) and torch.equal(written["mask"], tree["mask"])


def test_tensors_sharing_storage_are_written_as_separate_copies(tmp_path):
    weight = torch.randn(6, 4)
    tree = {"embed.weight": weight, "head.weight": weight, "row": weight[2], "column": weight[:, 1], "rest": weight[3:]}
    torch.save(tree, tmp_path / "tied.bin")
    loaded = torch.load(tmp_path / "tied.bin", weights_only=True)
    assert len({t.untyped_storage().data_ptr() for t in loaded.values()}) == 1  # the pickle keeps them shared

    result = run_convert(tmp_path / "tied.bin", tmp_path / "tied.safetensors", "--check")

    assert result.returncode == 0, result.stderr
    written = load_file(tmp_path / "tied.safetensors")
    for key, tensor in tree.items():
        assert_bits_equal(written[key], tensor)


# the checks below need no subprocess: convert_weights is the command's whole work


def test_plain_values_go_into_the_metadata_and_no_adapter_has_no_kind(tmp_path):
    torch.save({"encoder": {"layer.0.weight": torch.randn(3, 2)}, "step": 1200, "lr": 0.5, "name": "run 7"},
               tmp_path / "model.pt")

    convert_weights(tmp_path / "model.pt", tmp_path / "model.safetensors", check=True)

    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as handle:
        assert list(handle.keys()) == ["encoder.layer.0.weight"]
        assert handle.metadata() == {"format": "pt", "step": "1200", "lr": "0.5", "name": "run 7"}
    assert describe_adapter(tmp_path / "model.pt") is None


def test_a_value_that_is_neither_tensor_nor_plain_is_refused_naming_its_key(tmp_path):
    torch.save({"model": {"w": torch.zeros(2)}, "optimizer": {"param_groups": [{"lr": 0.1}]}}, tmp_path / "state.pt")

    with pytest.raises(ConvertError, match=r"'optimizer\.param_groups' holds a list") as error:
        convert_weights(tmp_path / "state.pt", tmp_path / "state.safetensors")

    assert "\n" not in str(error.value) and not (tmp_path / "state.safetensors").exists()


def test_a_dtype_that_safetensors_cannot_hold_is_refused_naming_its_key(tmp_path):
    torch.save({"w": torch.zeros(2), "phase": torch.zeros(2, dtype=torch.complex128)}, tmp_path / "complex.pt")

    with pytest.raises(ConvertError, match=r"tensor 'phase' is complex128, which safetensors cannot hold"):
        convert_weights(tmp_path / "complex.pt", tmp_path / "complex.safetensors")


def test_check_refuses_a_file_that_does_not_read_back_as_written(tmp_path, monkeypatch):
    def save_one_bit_off(tensors, path, metadata=None):
        changed = dict(tensors, w=tensors["w"].clone())
        changed["w"].view(torch.int32)[0] ^= 1
        save_file(changed, path, metadata=metadata)

    torch.save({"w": torch.randn(4)}, tmp_path / "model.bin")
    (tmp_path / "model.safetensors").write_bytes(b"the previous file")
    monkeypatch.setattr(convert_module, "save_file", save_one_bit_off)

    convert_weights(tmp_path / "model.bin", tmp_path / "unchecked.safetensors")  # without --check: written
    with pytest.raises(ConvertError, match="tensor 'w' differs"):
        convert_weights(tmp_path / "model.bin", tmp_path / "model.safetensors", check=True)

    assert (tmp_path / "model.safetensors").read_bytes() == b"the previous file"


def test_a_name_that_the_dots_join_twice_is_refused(tmp_path):
    torch.save({"a.b": torch.zeros(1), "a": {"b": torch.ones(1)}}, tmp_path / "twice.pt")

    with pytest.raises(ConvertError, match=r"'a\.b' occurs twice"):
        convert_weights(tmp_path / "twice.pt", tmp_path / "twice.safetensors")


def test_the_input_itself_is_refused_as_output(tmp_path):
    torch.save({"w": torch.zeros(2)}, tmp_path / "model.bin")
    convert_weights(tmp_path / "model.bin", tmp_path / "model.safetensors")
    before = (tmp_path / "model.safetensors").read_bytes()

    with pytest.raises(ConvertError, match="is the input"):
        convert_weights(tmp_path / "model.safetensors", tmp_path / "." / "model.safetensors", dtype="fp16")

    assert (tmp_path / "model.safetensors").read_bytes() == before
