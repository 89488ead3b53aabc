"""The trainer on CPU: embedded default end to end, export compatibility, resume, data, errors."""
from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

from ipadapter.attention import decoupled_attention
from ipadapter.adapter_file import load_adapter
from ipadapter.image_prompt import layer_keys_values
from ipadapter.registry.families import SD15
from training import run_files
from training.adapter import IPAdapterModel
from training.run_files import export_adapter
from training.config import Config, ConfigError, load_config
from training.data import DataError, DataPosition, IndexedPairs, ShardStream, make_loader, open_source, write_toy_dataset
from training.models import ModelFileError, build_embedded_models
from training.run import main

from training_fixtures import (
    write_fake_single_file,
    write_shards,
    ReferenceImageProjModel,
    reference_adapter_modules,
    write_folder_with_bad_rows,
    write_manifest_with_bad_rows,
    write_model_files,
)

REPO = Path(__file__).resolve().parents[1]


def small_run_args(output_dir: Path, data: Path, steps: int, **extra) -> list[str]:
    args = {
        "train.output_dir": output_dir, "data.path": data, "train.max_steps": steps, "train.batch_size": 2,
        "data.resolution": 64, "train.save_every": 2, "train.log_every": 2, "sample.every": 0, "train.progress": "false",
        "data.num_workers": 0, **extra,
    }
    return [item for key, value in args.items() for item in (f"--{key}", str(value))]


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory) -> Path:
    return write_toy_dataset(tmp_path_factory.mktemp("toy"), count=16, seed=1)


# --- the embedded default ----------------------------------------------------------------


def test_embedded_default_runs_end_to_end_and_loss_falls(tmp_path, capsys):
    result = main(["--train.output_dir", str(tmp_path), "--train.max_steps", "80", "--train.log_every", "10",
                   "--sample.every", "40", "--sample.steps", "2", "--train.progress", "false"])
    history = result["history"]
    assert len(history) == 8
    assert sum(history[-2:]) / 2 < 0.9 * sum(history[:2]) / 2, history
    safetensors_path, bin_path = result["export"]
    out = capsys.readouterr().out
    assert f"exported adapter: {safetensors_path.resolve()}" in out and "--model.base" in out
    checkpoint = load_adapter(safetensors_path, base_width=None)
    assert checkpoint.spec.variant == "base" and checkpoint.spec.num_tokens == 4
    assert load_adapter(bin_path, base_width=None).spec == checkpoint.spec
    with safe_open(str(safetensors_path), "pt") as handle:
        assert len(handle.keys()) == 36
        assert handle.get_tensor("ip_adapter.1.to_k_ip.weight").dtype == torch.float16
        metadata = handle.metadata()
    assert metadata["step"] == "80" and yaml.safe_load(metadata["config"])["optim"]["lr"] == 1e-4
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["train"]["max_steps"] == 80 and saved["data"]["drop_image"] == 0.05
    assert sorted(p.name for p in (tmp_path / "samples").glob("*.png")) == ["step-00000040.png", "step-00000080.png"]
    assert list((tmp_path / "tensorboard").glob("events.*"))


# --- export compatibility -------------------------------------------------------------------


def _copy_unet(unet):
    from diffusers import UNet2DConditionModel

    copy = UNet2DConditionModel.from_config(unet.config)
    copy.load_state_dict(unet.state_dict(), strict=True)
    return copy.eval()


def test_export_loads_in_diffusers_reference_modules_and_core_with_same_outputs(tmp_path):
    from diffusers import StableDiffusionPipeline

    frozen = build_embedded_models(SD15, seed=3)
    plain_unet = _copy_unet(frozen.unet)
    model = IPAdapterModel(frozen.unet, frozen.image_encoder.embed_dim).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # trained-looking weights, not the K/V copies of the initialisation
        for parameter in model.trainable_parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    safetensors_path = export_adapter(model, tmp_path / "adapter.safetensors", 7, "config: x", dtype="fp32")
    bin_path = export_adapter(model, tmp_path / "adapter.bin", 7, "config: x", dtype="fp32")

    latents = torch.randn(2, 4, 8, 8, generator=generator)
    timesteps = torch.tensor([10, 700])
    text = torch.randn(2, 77, 768, generator=generator)
    embeds = torch.randn(2, 32, generator=generator)
    with torch.no_grad():
        ours = model(latents, timesteps, text, embeds)
        ours_text_only = model(latents, timesteps, text, embeds, scale=0.0)

        # diffusers: the pipeline's own load_ip_adapter on a UNet of the same layout
        diffusers_unet = _copy_unet(plain_unet)
        pipe = StableDiffusionPipeline(
            vae=frozen.vae, text_encoder=frozen.text_encoders["text_encoder"], tokenizer=None, unet=diffusers_unet,
            scheduler=frozen.scheduler, safety_checker=None, feature_extractor=None, image_encoder=None,
            requires_safety_checker=False,
        )
        pipe.load_ip_adapter(str(tmp_path), subfolder="", weight_name="adapter.safetensors", image_encoder_folder=None)
        from_diffusers = diffusers_unet(latents, timesteps, encoder_hidden_states=text,
                                        added_cond_kwargs={"image_embeds": [embeds[:, None]]}).sample

        # the reference's modules, strict load of the nested .bin
        reference_unet = _copy_unet(plain_unet)
        adapter_modules = reference_adapter_modules(reference_unet)
        assert len(adapter_modules) == 32
        image_proj = ReferenceImageProjModel(768, 32, 4)
        nested = torch.load(bin_path, weights_only=True)
        image_proj.load_state_dict(nested["image_proj"], strict=True)
        adapter_modules.load_state_dict(nested["ip_adapter"], strict=True)
        context = torch.cat([text, image_proj(embeds)], dim=1)
        from_reference = reference_unet(latents, timesteps, encoder_hidden_states=context).sample

        # the core (what the ComfyUI nodes use): load_adapter + per-layer K'/V' by official key
        from_core = _core_forward(_copy_unet(plain_unet), load_adapter(safetensors_path, base_width=None),
                                  latents, timesteps, text, embeds)
        text_only = plain_unet(latents, timesteps, encoder_hidden_states=text).sample

    for other in (from_diffusers, from_reference, from_core):
        torch.testing.assert_close(other, ours, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours_text_only, text_only, atol=1e-6, rtol=0)
    assert (ours - text_only).abs().max() > 1e-3  # the image prompt does something


def _core_forward(unet, checkpoint, latents, timesteps, text, embeds):
    tokens = checkpoint.build_projection()(embeds)
    keys_values = layer_keys_values(checkpoint, tokens, torch.device("cpu"), torch.float32)

    class CoreProcessor:
        def __init__(self, key):
            self.key = key

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
            q = attn.to_q(hidden_states)
            k_ip, v_ip = keys_values[self.key]
            out = decoupled_attention(q, attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states), k_ip, v_ip, attn.heads)
            return attn.to_out[1](attn.to_out[0](out))

    from diffusers.models.attention_processor import AttnProcessor2_0

    unet.set_attn_processor({
        name: CoreProcessor(SD15.layer_by_diffusers_name[name[: -len(".processor")]].key) if name.endswith("attn2.processor") else AttnProcessor2_0()
        for name in unet.attn_processors
    })
    return unet(latents, timesteps, encoder_hidden_states=text).sample


def test_trainable_layers_start_from_text_kv_and_are_numbered_by_processor_order():
    frozen = build_embedded_models(SD15, seed=0)
    model = IPAdapterModel(frozen.unet, 32)
    assert list(model.layers) == [str(k) for k in range(1, 32, 2)]
    modules = dict(frozen.unet.named_modules())
    for key, layer in model.layers.items():
        name = next(n for n, i in enumerate_processors(frozen.unet) if i == int(key))
        attn = modules[name[: -len(".processor")]]
        assert torch.equal(layer.to_k_ip.weight, attn.to_k.weight) and torch.equal(layer.to_v_ip.weight, attn.to_v.weight)
    assert not any(p.requires_grad for p in frozen.unet.parameters())
    assert all(p.requires_grad and p.dtype == torch.float32 for p in model.trainable_parameters())
    assert not any("ip" in k for k in frozen.unet.state_dict())  # no aliased adapter weights in the UNet


def enumerate_processors(unet):
    return [(name, index) for index, name in enumerate(unet.attn_processors)]


# --- resume ---------------------------------------------------------------------------------


class Interrupted(Exception):
    pass


def test_resume_after_interruptions_matches_uninterrupted_run_bitwise(tmp_path, toy_data, monkeypatch):
    straight = main(small_run_args(tmp_path / "straight", toy_data, 6))
    reference = torch.load(tmp_path / "straight" / "state" / "step-00000006" / "adapter.pt", weights_only=True)

    interrupted = tmp_path / "interrupted"
    real_save = torch.save

    def dies_while_saving_step_4(obj, path, *args, **kwargs):
        if "step-00000004" in str(path) and Path(path).name.startswith("rank-"):
            raise Interrupted("killed during the save of step 4")
        real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(run_files.torch, "save", dies_while_saving_step_4)
    with pytest.raises(Interrupted):
        main(small_run_args(interrupted, toy_data, 6))
    monkeypatch.setattr(run_files.torch, "save", real_save)
    assert (interrupted / "state" / "latest").read_text() == "step-00000002"
    assert (interrupted / "state" / ".tmp-step-00000004").is_dir()  # the half-written state is never used

    def dies_after_step_5(step):
        if step == 5:
            raise Interrupted("killed after step 5")

    with pytest.raises(Interrupted):
        main(small_run_args(interrupted, toy_data, 6) + ["--resume"], extra_hooks=[dies_after_step_5])
    assert (interrupted / "state" / "latest").read_text() == "step-00000004"
    resumed = main(small_run_args(interrupted, toy_data, 6) + ["--resume"])
    final = torch.load(interrupted / "state" / "step-00000006" / "adapter.pt", weights_only=True)
    assert final.keys() == reference.keys()
    for key in reference:
        assert torch.equal(final[key], reference[key]), key
    assert resumed["step"] == straight["step"] == 6
    exported = load_adapter(interrupted / "ip-adapter_sd15_step00000006.safetensors", base_width=None).flat_state_dict()
    expected = load_adapter(tmp_path / "straight" / "ip-adapter_sd15_step00000006.safetensors", base_width=None).flat_state_dict()
    assert all(torch.equal(exported[key], expected[key]) for key in expected)


# --- data -----------------------------------------------------------------------------------


def _epoch_skips(source, resolution=32) -> Counter:
    dataset = IndexedPairs(source.pairs, resolution, seed=0)
    skipped = Counter()
    for position in range(len(dataset)):
        sample = dataset[position]
        assert sample["pixels"].shape == (3, resolution, resolution) and sample["clip_pixels"].shape == (3, 224, 224)
        skipped.update(sample["skipped"])
    return skipped


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_manifest_bad_rows_are_skipped_and_counted(tmp_path, suffix):
    source = open_source(str(write_manifest_with_bad_rows(tmp_path, suffix=suffix)))
    assert source.kind == "manifest" and len(source.pairs) == 8  # 6 good + a broken and a missing image, found at load time
    expected = Counter({"empty caption": 1})
    if suffix == ".jsonl":
        expected["unreadable row"] = 1
    assert source.scan_skipped == expected
    assert _epoch_skips(source) == Counter({"broken image": 1, "missing file": 1})


def test_folder_bad_rows_are_skipped_and_counted(tmp_path):
    source = open_source(str(write_folder_with_bad_rows(tmp_path)))
    assert source.kind == "folder" and len(source.pairs) == 7
    assert source.scan_skipped == Counter({"missing caption": 1, "empty caption": 1})
    assert _epoch_skips(source) == Counter({"broken image": 1})


def test_webdataset_split_across_ranks_and_workers_without_duplicates_and_bad_samples_counted(tmp_path):
    write_shards(tmp_path, shards=4, per_shard=5)
    source = open_source(str(tmp_path / "{00000..00003}.tar"))
    assert source.kind == "webdataset" and len(source.shards) == 4
    seen, skipped = [], Counter()
    for rank in range(2):
        for worker in range(2):
            stream = ShardStream(source.shards, 32, seed=0, rank=rank, world_size=2)
            stream.worker_override = (worker, 2)
            samples = iter(stream)
            seen += [next(samples)["caption"] for _ in range(5)]  # one shard each: exactly one epoch
            # the shard's 3 bad samples come after its good ones: reported with the next epoch's first sample
            skipped.update(next(samples)["skipped"])
    assert len(seen) == len(set(seen)) == 20
    assert skipped == Counter({"broken image": 4, "empty caption": 4, "no image in sample": 4})


def test_too_few_shards_for_ranks_and_workers_is_a_clear_error(tmp_path):
    write_shards(tmp_path, shards=3, per_shard=1, bad=False)
    with pytest.raises(DataError, match="3 shards cannot be split over 2 ranks x 2 workers"):
        make_loader(open_source(str(tmp_path)), 32, 2, 0, 0, 2, 2)


def test_webdataset_damaged_shard_is_counted_not_fatal(tmp_path):
    good, damaged = write_shards(tmp_path, shards=2, per_shard=3, bad=False)
    damaged.write_bytes(damaged.read_bytes()[:700])
    loader = make_loader(open_source(str(tmp_path)), 32, 2, 0, 0, 1, 0)
    position = DataPosition(0)
    batches = iter(loader)
    for _ in range(6):
        position.consumed(next(batches))
    assert position.skipped["unreadable shard"] >= 1


def test_loader_counts_skips_and_continues_at_the_saved_position(tmp_path):
    source = open_source(str(write_manifest_with_bad_rows(tmp_path)))
    loader = make_loader(source, 32, 2, 0, 0, 1, 0)
    position = DataPosition(0)
    batches = iter(loader)
    captions = []
    for _ in range(7):
        batch = next(batches)
        position.consumed(batch)
        captions.append(batch["captions"])
    assert position.skipped["broken image"] >= 1
    later = make_loader(source, 32, 2, 0, 0, 1, 0, position={"step": 4})
    assert [next(iter(later))["captions"]] == captions[4:5]


def test_two_ranks_see_the_global_batch_of_one_process(toy_data):
    source = open_source(str(toy_data))
    single = next(iter(make_loader(source, 32, 4, 0, 0, 1, 0, position={"step": 3})))["captions"]
    split = [next(iter(make_loader(source, 32, 2, 0, rank, 2, 0, position={"step": 3})))["captions"] for rank in range(2)]
    assert split[0] + split[1] == single


# --- clear errors before training -----------------------------------------------------------


def test_unreadable_manifests_are_clear_errors(tmp_path):
    garbage = tmp_path / "garbage.jsonl"
    garbage.write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(DataError, match="not readable text"):
        open_source(str(garbage))
    with pytest.raises(DataError, match="does not exist"):
        open_source(str(tmp_path / "nope.jsonl"))
    no_columns = tmp_path / "columns.csv"
    no_columns.write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match="no image column"):
        open_source(str(no_columns))
    nothing = tmp_path / "empty.jsonl"
    nothing.write_text('{"image": "missing.png", "text": "x"}\n')
    with pytest.raises(DataError, match="none of the first 1 image files exist"):
        open_source(str(nothing))


def test_missing_model_files_are_clear_errors_before_training(tmp_path, toy_data):
    args = small_run_args(tmp_path / "out", toy_data, 2)
    with pytest.raises(ModelFileError, match="does not exist; expected a diffusers model folder"):
        main(args + ["--model.base", str(tmp_path / "nope"), "--model.image_encoder", str(tmp_path / "enc.safetensors")])
    (tmp_path / "sd15").mkdir()
    with pytest.raises(ModelFileError, match=r"'sd15' \(model.base\) is not a base model of SD1.5 or SDXL or Flux.1 or SD3.5 Large \(found no subfolders\)"):
        main(args + ["--model.base", str(tmp_path / "sd15"), "--model.image_encoder", str(tmp_path / "enc.safetensors")])
    (tmp_path / "sd15" / "unet").mkdir()
    (tmp_path / "sd15" / "text_encoder").mkdir()
    with pytest.raises(ModelFileError, match="SD1.5 folder .* has no vae/; expected a diffusers SD1.5 folder"):
        main(args + ["--model.base", str(tmp_path / "sd15"), "--model.image_encoder", str(tmp_path / "enc.safetensors")])
    not_sd = tmp_path / "not_sd.safetensors"
    from safetensors.torch import save_file

    save_file({"some.weight": torch.zeros(2)}, str(not_sd))
    with pytest.raises(ModelFileError, match=r"is not a base model of SD1.5 or SDXL or Flux.1 or SD3.5 Large \(found some.weight\)"):
        main(args + ["--model.base", str(not_sd), "--model.image_encoder", str(tmp_path / "enc.safetensors")])
    assert not (tmp_path / "out" / "state").exists()


@pytest.fixture(scope="module")
def model_files(tmp_path_factory) -> tuple[Path, Path]:
    """A scaled-down SD1.5 as a diffusers folder and an OpenCLIP-format image encoder file."""
    sd15, encoder, _ = write_model_files(tmp_path_factory.mktemp("models"))
    return sd15, encoder


def test_training_from_a_diffusers_folder_and_an_encoder_file(tmp_path, toy_data, model_files):
    sd15, encoder = model_files
    result = main(small_run_args(tmp_path, toy_data, 2) + ["--model.base", str(sd15), "--model.image_encoder", str(encoder),
                                                            "--model.encoder_embed_dim", "32"])
    assert load_adapter(result["export"][0], base_width=None).spec.encoder_width == 32


def test_image_encoder_of_the_wrong_width_is_a_clear_error(tmp_path, toy_data, model_files):
    sd15, encoder = model_files
    args = small_run_args(tmp_path, toy_data, 2) + ["--model.base", str(sd15)]
    with pytest.raises(ModelFileError, match="gives 32-d image embeddings; expected 1024 \\(OpenCLIP ViT-H/14"):
        main(args + ["--model.image_encoder", str(encoder)])
    text_only = tmp_path / "text.safetensors"
    from safetensors.torch import save_file

    save_file({"text_model.embeddings.token_embedding.weight": torch.zeros(4, 4)}, str(text_only))
    with pytest.raises(ModelFileError, match="a CLIP text model without a vision tower"):
        main(args + ["--model.image_encoder", str(text_only)])


def test_text_encoder_weights_load_with_or_without_the_text_model_prefix():
    from transformers import CLIPTextConfig, CLIPTextModel

    from training.weight_files import materialise, text_state

    config = CLIPTextConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
                            vocab_size=49408, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    source = CLIPTextModel(config)
    template = CLIPTextModel(config)
    for prefix in ("text_model.", ""):  # SD1.5 files / transformers 5 state dicts
        tensors = {prefix + k.removeprefix("text_model."): v.clone() for k, v in source.state_dict().items()}
        target = materialise(lambda: CLIPTextModel(config), text_state(tensors, template), "text encoder", "test", "CLIP")
        assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), target.state_dict().values()))
    with pytest.raises(ModelFileError, match="the text encoder lacks .* weights"):
        materialise(lambda: CLIPTextModel(config), {"text_model.final_layer_norm.weight": torch.ones(32)}, "text encoder",
                    "test", "CLIP")


def test_bf16_frozen_models_keep_fp32_trainable_weights(tmp_path, toy_data):
    result = main(small_run_args(tmp_path, toy_data, 2) + ["--model.frozen_dtype", "bf16"])
    assert all(torch.isfinite(torch.tensor(result["history"])))
    state = torch.load(tmp_path / "state" / "step-00000002" / "adapter.pt", weights_only=True)
    assert all(t.dtype == torch.float32 for t in state.values())


def test_config_defaults_are_the_paper_values_and_overrides_work(tmp_path):
    assert yaml.safe_load((REPO / "training" / "configs" / "default.yaml").read_text()) == Config().to_dict() | {
        "model": Config().to_dict()["model"]}
    base = write_fake_single_file(tmp_path / "v1-5.safetensors", SD15)
    config, flags = load_config(["--model.base", str(base), "--model.image_encoder", "b", "--lr", "2e-4", "--train.batch_size=4",
                                 "--resume"])
    assert (config.optim.lr, config.optim.weight_decay, config.train.batch_size) == (2e-4, 0.01, 4)
    assert (config.data.resolution, config.data.drop_image, config.data.drop_text, config.data.drop_both) == (512, 0.05, 0.05, 0.05)
    assert flags == {"resume": "latest"} and not config.embedded and config.family is SD15
    embedded, _ = load_config([])
    assert embedded.embedded and embedded.data.resolution == 64 and embedded.optim.lr == 1e-4
    user = tmp_path / "mine.yaml"
    user.write_text("train:\n  max_steps: 7\n")
    assert load_config(["--config", str(user), "--train.seed", "3"])[0].train.max_steps == 7
    for bad, message in ((["--bogus", "1"], "unknown option 'bogus'"), (["--batch_size", "x"], "expected int"), (["--seed", "1"], "ambiguous"),
                         (["--model.base", "a"], "model.image_encoder is not"), (["--data.drop_both", "0.95"], "sum to")):
        with pytest.raises(ConfigError, match=message):
            load_config(bad)


def test_cli_reports_errors_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "training.run", "--data.path", str(tmp_path / "none.jsonl")],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: manifest")


def test_webdataset_stream_resumes_at_the_saved_position_with_workers(tmp_path):
    write_shards(tmp_path, shards=4, per_shard=3)
    source = open_source(str(tmp_path))
    straight = iter(make_loader(source, 32, 2, 0, 0, 1, 2))
    position = DataPosition(2)
    for _ in range(5):
        position.consumed(next(straight))
    expected = [next(straight)["captions"] for _ in range(3)]
    resumed = iter(make_loader(source, 32, 2, 0, 0, 1, 2, position=position.state()))
    assert [next(resumed)["captions"] for _ in range(3)] == expected


def test_indexed_loader_with_workers_gives_the_same_batches(toy_data):
    source = open_source(str(toy_data))
    without = iter(make_loader(source, 32, 3, 0, 0, 1, 0))
    with_workers = iter(make_loader(source, 32, 3, 0, 0, 1, 2))
    for _ in range(3):
        a, b = next(without), next(with_workers)
        assert a["captions"] == b["captions"] and torch.equal(a["pixels"], b["pixels"])


def test_full_size_sd15_layout_has_the_papers_parameter_count():
    from diffusers import UNet2DConditionModel

    from training.base_models import config_dir

    config = UNet2DConditionModel.load_config(str(config_dir(SD15)), subfolder="unet", local_files_only=True)
    with torch.device("meta"):  # shapes only, no memory
        unet = UNet2DConditionModel.from_config(config)
        model = IPAdapterModel(unet, embed_dim=1024, num_tokens=4)
    assert model.num_trainable() == 22_319_616
    assert sum(p.numel() for p in model.image_proj.parameters()) == 3_150_336


def test_init_adapter_starts_from_the_files_weights_and_refuses_other_adapters(tmp_path, toy_data):
    from devtools.adapter_factory import random_adapter
    from safetensors.torch import save_file

    from training.adapter import IPAdapterModel, start_from_adapter_file
    from training.models import build_embedded_models

    first = main(small_run_args(tmp_path / "first", toy_data, 2))
    exported = first["export"][0]
    frozen = build_embedded_models(SD15)
    model = IPAdapterModel(frozen.unet, frozen.image_encoder.embed_dim)
    start_from_adapter_file(model, exported)
    file_tensors = load_adapter(exported, base_width=None).flat_state_dict()
    ours = model.trainable_state_dict()
    assert set(ours) == set(file_tensors)
    assert all(torch.equal(ours[k], v.float()) for k, v in file_tensors.items())

    # a run with init_adapter: its first logged loss is the exported model's, not a fresh one's
    again = main(small_run_args(tmp_path / "again", toy_data, 2, **{"model.init_adapter": exported}))
    fresh = main(small_run_args(tmp_path / "fresh", toy_data, 2))
    assert again["history"][0] != fresh["history"][0]

    sdxl = tmp_path / "ip-adapter_sdxl_vit-h.safetensors"
    save_file({f"{g}.{k}": v for g, t in random_adapter("base", family="sdxl", dtype=torch.float16).items()
               for k, v in t.items()}, str(sdxl))
    with pytest.raises(ModelFileError, match="is an SDXL adapter .* expected an SD1.5 adapter"):
        main(small_run_args(tmp_path / "wrong", toy_data, 2, **{"model.init_adapter": sdxl}))
    plus = tmp_path / "ip-adapter-plus_sd15.safetensors"
    save_file({f"{g}.{k}": v for g, t in random_adapter("plus", base_width=32).items() for k, v in t.items()}, str(plus))
    with pytest.raises(ModelFileError, match="expected a base adapter with 4 tokens from 32-d image embeddings"):
        main(small_run_args(tmp_path / "wrong", toy_data, 2, **{"model.init_adapter": plus}))
    assert not (tmp_path / "wrong" / "state").exists()
