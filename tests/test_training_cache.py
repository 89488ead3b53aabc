"""``python -m training.cache``: the frozen encoders' outputs computed once, and training from them.

Training from the cache must be the same computation as encoding online: same samples,
same skips, same per-sample draws, same loss.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from training import cache as cache_module
from training.adapter import IPAdapterModel
from training.cache import CacheError, build_cache, default_root, key_of, fingerprint, open_cache
from training.config import load_config
from training.data import DataPosition, make_loader, open_source, write_toy_dataset
from training.distributed import Engine, Process
from training.loop import batch_positions, compute_loss, sample_draws
from ipadapter.registry.families import SD15
from training.models import build_embedded_models, seeded
from training.run import main
from training.variants import adapter_spec

from training_fixtures import write_folder_with_bad_rows, write_manifest_with_bad_rows, write_model_files, write_shards

REPO = Path(__file__).resolve().parents[1]
RESOLUTION = 32
CPU = torch.device("cpu")


def config_for(data: Path, *extra: str):
    config, _ = load_config(["--data.path", str(data), "--data.resolution", str(RESOLUTION), "--data.num_workers", "0",
                             "--train.batch_size", "3", "--cache.shard_size", "4", "--cache.encode_batch", "3", *extra])
    return config


@pytest.fixture(scope="module")
def frozen():
    return build_embedded_models(SD15, seed=42).to(CPU)  # the embedded run's models (seed = train.seed)


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory) -> Path:
    return write_toy_dataset(tmp_path_factory.mktemp("toy") / "images", count=10, seed=2)


def shard_tensors(folder: Path) -> dict:
    result = {}
    for path in sorted(folder.glob("shard-*.safetensors")):
        with safe_open(str(path), "pt") as handle:
            result[path.name] = ({name: handle.get_tensor(name) for name in handle.keys()}, handle.metadata())
    return result


def assert_same_shards(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    for name in a:
        assert a[name][1] == b[name][1], name
        for key, tensor in a[name][0].items():
            assert torch.equal(tensor, b[name][0][key]), (name, key)


# --- the same computation --------------------------------------------------------------


@pytest.mark.parametrize("family, variant", [("sd15", "base"), ("sd15", "plus"), ("sdxl", "base"), ("sdxl", "plus")])
def test_a_step_from_the_cache_has_the_loss_and_gradients_of_the_online_step(tmp_path, toy_data, frozen, family, variant):
    """Same seed, same batch: loss and adapter gradients from the cache equal the online step's.

    Tolerance: float32 rounding. The cache pass runs the encoders on batches of
    ``cache.encode_batch`` samples and the online step on the training batch; CPU kernels
    may sum in another order for another batch size (and the empty prompt, and for plus
    the zero image of a dropped one, are encoded alone), so the last bits of the encoders'
    outputs can differ. Everything random is drawn identically in both paths.
    """
    own_folder = ("--cache.dir", str(tmp_path / "cache")) if (family, variant) != ("sd15", "base") else ()  # the module's other tests see SD1.5 base caches
    config = config_for(toy_data, "--data.drop_image", "0.25", "--data.drop_text", "0.25", "--data.drop_both", "0.25",
                        "--model.variant", variant, "--model.family", family, *own_folder)
    if family == "sdxl":  # SDXL's cache also holds the pooled text and what the time ids record (size, crop)
        frozen = build_embedded_models(config.family, seed=42).to(CPU)
    source = open_source(str(toy_data))
    build_cache(config, source, frozen, CPU, progress=False)
    cache = open_cache(config, source, frozen.dtype)
    assert cache is not None
    process = Process("single", 0, 1, 0, CPU)
    encoder = frozen.image_encoder
    with seeded(0):
        model = IPAdapterModel(frozen.unet, spec=adapter_spec(variant, None, encoder.embed_dim, encoder.hidden_width, frozen.unet))
    engine = Engine(model, config, process)
    features = "image_embeds" if variant == "base" else "penultimate"
    online = iter(make_loader(source, RESOLUTION, 3, 42, 0, 1, 0))
    cached = iter(make_loader(source, RESOLUTION, 3, 42, 0, 1, 0, cache=cache))
    dropped_text = dropped_image = 0
    sizes = set()
    for step in range(4):
        online_batch, cached_batch = next(online), next(cached)
        assert "pixels" in online_batch and "pixels" not in cached_batch and "moments" in cached_batch
        assert set(cached_batch) & {"image_embeds", "penultimate"} == {features}
        if family == "sdxl":
            assert {"pooled_text", "original_size", "crop_top_left"} <= set(cached_batch)
            for name in ("original_size", "crop_top_left"):
                assert torch.equal(cached_batch[name], online_batch[name]), name
            sizes.update(map(tuple, online_batch["original_size"].tolist()))
        assert online_batch["captions"] == cached_batch["captions"]
        draws = sample_draws(42, batch_positions(step, process, 3), (4, RESOLUTION // 8, RESOLUTION // 8), 1000, config)
        dropped_text += sum(draws.drop_text)
        dropped_image += int((draws.keep_image == 0).sum())
        losses, gradients = [], []
        for batch in (online_batch, cached_batch):
            model.zero_grad(set_to_none=True)
            loss = compute_loss(engine, frozen, batch, draws, CPU)
            loss.backward()
            losses.append(loss.detach())
            gradients.append(torch.cat([p.grad.reshape(-1) for p in model.trainable_parameters()]))
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-7)
        if family == "sd15":
            torch.testing.assert_close(gradients[1], gradients[0], rtol=1e-4, atol=1e-6)
        else:  # 34M gradients through 10-deep transformers: float32 rounding of the encoders' outputs grows to ~1e-4
            assert (gradients[1] - gradients[0]).norm() <= 1e-3 * gradients[0].norm()
    assert dropped_text and dropped_image  # the drops are exercised, not just the plain case
    assert family == "sd15" or len(sizes) > 1  # SDXL: time ids of images of different sizes


@pytest.mark.parametrize("kind", ["manifest", "folder", "webdataset"])
def test_cached_batches_match_online_for_every_format_with_bad_samples(tmp_path, frozen, kind):
    if kind == "manifest":
        data = write_manifest_with_bad_rows(tmp_path / "data")
    elif kind == "folder":
        data = write_folder_with_bad_rows(tmp_path / "data")
    else:
        write_shards(tmp_path / "data", shards=2, per_shard=3)
        data = tmp_path / "data"
    config = config_for(data)
    source = open_source(str(data))
    summary = build_cache(config, source, frozen, CPU, progress=False)
    assert summary["complete"]
    expected_root = {"manifest": data.with_name("manifest.jsonl.cache"), "folder": tmp_path / "data.cache",
                     "webdataset": data / "ipadapter-cache"}[kind]
    assert summary["folder"].parent == expected_root == default_root(config, source)  # next to the data
    cache = open_cache(config, source, frozen.dtype)
    online, cached = iter(make_loader(source, RESOLUTION, 3, 0, 0, 1, 0)), iter(make_loader(source, RESOLUTION, 3, 0, 0, 1, 0, cache=cache))
    online_position, cached_position = DataPosition(0), DataPosition(0)
    for _ in range(5):  # more than an epoch: skips and (for shards) stream positions included
        a, b = next(online), next(cached)
        online_position.consumed(a)
        cached_position.consumed(b)
        assert a["captions"] == b["captions"]
        torch.testing.assert_close(b["image_embeds"], frozen.encode_images(a["clip_pixels"]), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b["moments"], frozen.encode_moments(a["pixels"]), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b["text_embeds"], frozen.encode_text(frozen.tokenize(a["captions"]))[0], rtol=1e-5, atol=1e-5)
    assert online_position.state() == cached_position.state()
    assert sum(online_position.skipped.values()) > 0


def test_training_from_the_cache_matches_online_training(tmp_path):
    toy_data = write_toy_dataset(tmp_path / "images", count=10, seed=2)

    def run(name: str, *extra: str) -> dict:
        args = ["--train.output_dir", str(tmp_path / name), "--data.path", str(toy_data), "--data.resolution", "32",
                "--train.max_steps", "3", "--train.batch_size", "2", "--train.save_every", "0", "--train.log_every", "1",
                "--sample.every", "0", "--train.progress", "false", "--data.num_workers", "0", *extra]
        main(args)
        return torch.load(tmp_path / name / "state" / "step-00000003" / "adapter.pt", weights_only=True)

    online = run("online", "--cache.use", "off")
    with pytest.raises(CacheError, match="no cache in .*; run python -m training.cache"):
        run("required", "--cache.use", "require")
    for text in ("embeds", "ids"):
        config, _ = load_config(["--data.path", str(toy_data), "--data.resolution", "32", "--cache.text", text,
                                 "--train.output_dir", str(tmp_path / "x")])
        source = open_source(str(toy_data))
        build_cache(config, source, build_embedded_models(SD15, seed=42).to(CPU), CPU, progress=False)
        cached = run(f"cached-{text}", "--cache.use", "require", "--cache.text", text)
        # AdamW's first steps move each element by about lr (1e-4) in the direction of its gradient's sign:
        # a float32 difference in a near-zero gradient element can flip it. So: all but a handful of the
        # 2M elements agree to 1e-6 and none is off by more than 2 lr per step; a different computation
        # (other latents, embeddings or drops) moves most elements by about lr.
        differences = torch.cat([(cached[key] - online[key]).abs().reshape(-1) for key in online])
        assert (differences > 1e-6).float().mean() < 1e-4, (differences > 1e-6).sum()
        assert differences.max() <= 3 * 2e-4


# --- invalidation, resume, ranks -------------------------------------------------------------


def test_a_cache_for_other_settings_is_not_used_and_says_why(tmp_path, toy_data, frozen, caplog):
    config = config_for(toy_data)
    source = open_source(str(toy_data))
    build_cache(config, source, frozen, CPU, progress=False)
    other_resolution = config_for(toy_data, "--data.resolution", "64")
    with caplog.at_level(logging.INFO, logger="training"):
        assert open_cache(other_resolution, source, frozen.dtype) is None
    assert "built for resolution 32 (this run: 64)" in caplog.text
    with pytest.raises(CacheError, match="resolution 32 \\(this run: 64\\).*cache.use is require"):
        open_cache(config_for(toy_data, "--data.resolution", "64", "--cache.use", "require"), source, frozen.dtype)
    with pytest.raises(CacheError, match="built for other embedded models"):  # the embedded models of another seed
        open_cache(config_for(toy_data, "--cache.use", "require", "--train.seed", "7"), source, frozen.dtype)
    assert open_cache(config_for(toy_data, "--cache.use", "off"), source, frozen.dtype) is None
    assert open_cache(config, source, frozen.dtype) is not None
    # a base cache holds pooled embeddings: a plus run (penultimate hidden states) never uses it
    alone = ("--cache.dir", str(tmp_path / "base-only"))
    build_cache(config_for(toy_data, *alone), source, frozen, CPU, progress=False)
    with pytest.raises(CacheError, match="built for image features image_embeds \\(this run: penultimate, model.variant\\)"):
        open_cache(config_for(toy_data, *alone, "--cache.use", "require", "--model.variant", "plus"), source, frozen.dtype)


def test_the_cache_of_model_files_is_found_before_loading_and_follows_the_encoders_files(tmp_path, toy_data, caplog):
    """A run finds its cache from the files alone and then reads no encoder; other encoder files (another image
    encoder, other text-encoder weights) are another cache; the UNet is not part of it."""
    from training.cache import main as cache_main

    sd15, encoder, _ = write_model_files(tmp_path / "models")
    args = ["--model.base", str(sd15), "--model.image_encoder", str(encoder), "--model.encoder_embed_dim", "32",
            "--data.path", str(toy_data), "--data.resolution", str(RESOLUTION), "--data.num_workers", "0",
            "--train.batch_size", "2", "--train.max_steps", "1", "--sample.every", "0", "--train.progress", "false",
            "--train.output_dir", str(tmp_path / "out"), "--cache.dir", str(tmp_path / "cache")]
    with caplog.at_level(logging.INFO, logger="training"):
        cache_main(args)
    assert "models: not read (never run here): unet" in caplog.text
    caplog.clear()
    source = open_source(str(toy_data))
    config, _ = load_config(args + ["--cache.use", "require"])
    cache = open_cache(config, source, torch.float32)
    assert cache is not None and cache.image_embed_dim == 32
    with caplog.at_level(logging.INFO, logger="training"):
        result = main(args + ["--cache.use", "require"])
    assert "cache: training from" in caplog.text and len(result["history"]) == 1
    assert "models: not read (never run here): image encoder, text encoder" in caplog.text

    unet_weights = sd15 / "unet" / "diffusion_pytorch_model.safetensors"
    unet_weights.write_bytes(unet_weights.read_bytes()[::-1])  # the UNet is not part of what the cache depends on
    assert open_cache(config, source, torch.float32) is not None
    other = write_model_files(tmp_path / "other", seed=11)[1]
    encoder.write_bytes(other.read_bytes())  # the same name and size, other weights
    with pytest.raises(CacheError, match="built for other image encoder files;"):
        open_cache(config, source, torch.float32)


def test_a_killed_pass_resumes_and_skips_written_shards(tmp_path, toy_data, frozen, monkeypatch):
    config = config_for(toy_data, "--cache.dir", str(tmp_path / "straight"))
    source = open_source(str(toy_data))
    straight = build_cache(config, source, frozen, CPU, progress=False)
    assert straight["written"] == 3  # 10 pairs, 4 per shard

    config = config_for(toy_data, "--cache.dir", str(tmp_path / "killed"))
    real_save, saved = cache_module._save_shard, []

    def dies_on_the_second_shard(tensors, path, metadata=None):
        if path.name == "shard-000001.safetensors":
            raise KeyboardInterrupt("killed")
        saved.append(path.name)
        real_save(tensors, path, metadata)

    monkeypatch.setattr(cache_module, "_save_shard", dies_on_the_second_shard)
    with pytest.raises(KeyboardInterrupt):
        build_cache(config, source, frozen, CPU, progress=False)
    monkeypatch.setattr(cache_module, "_save_shard", real_save)
    folder = default_root(config, source) / key_of(fingerprint(config, source, frozen.dtype))
    assert sorted(p.name for p in folder.glob("shard-*")) == ["shard-000000.safetensors"]  # no half-written shard
    assert open_cache(config, source, frozen.dtype) is None  # incomplete: not used

    encoded = []
    real_encode = cache_module.encode_unit
    monkeypatch.setattr(cache_module, "encode_unit", lambda *a, **k: encoded.append(len(a[2])) or real_encode(*a, **k))
    resumed = build_cache(config, source, frozen, CPU, progress=False)
    assert (resumed["written"], resumed["skipped"], resumed["complete"]) == (2, 1, True)
    assert encoded == [4, 2]  # only the missing shards were encoded
    assert_same_shards(shard_tensors(folder), shard_tensors(straight["folder"]))


def test_ranks_write_disjoint_shards_that_make_the_whole_cache(tmp_path, toy_data, frozen):
    single = build_cache(config_for(toy_data, "--cache.dir", str(tmp_path / "one")), open_source(str(toy_data)), frozen, CPU,
                         progress=False)
    config = config_for(toy_data, "--cache.dir", str(tmp_path / "two"))
    source = open_source(str(toy_data))
    first = build_cache(config, source, frozen, CPU, rank=0, world_size=2, progress=False)
    assert (first["written"], first["complete"]) == (2, False)
    assert sorted(p.name for p in first["folder"].glob("shard-*")) == ["shard-000000.safetensors", "shard-000002.safetensors"]
    second = build_cache(config, source, frozen, CPU, rank=1, world_size=2, progress=False)
    assert (second["written"], second["complete"]) == (1, True)
    assert_same_shards(shard_tensors(second["folder"]), shard_tensors(single["folder"]))


def test_cli_splits_by_rank_environment_and_reports_the_folder(tmp_path):
    data = write_toy_dataset(tmp_path / "images", count=6, seed=3)
    command = [sys.executable, "-m", "training.cache", "--data.path", str(data), "--data.resolution", "32",
               "--cache.shard_size", "2", "--data.num_workers", "0", "--train.progress", "false"]
    outputs = []
    for rank in (1, 0):
        environment = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}
        result = subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        outputs.append(result.stdout)
    assert "1 shards written, 0 already there; not complete yet" in outputs[0]
    assert "2 shards written, 0 already there; complete" in outputs[1]
    assert len(list((tmp_path / "images.cache").glob("*/shard-*.safetensors"))) == 3


def test_a_non_finite_loss_stops_the_run_at_the_next_log_or_save_step_naming_its_step(tmp_path, toy_data, monkeypatch):
    """Losses are read back only every train.log_every steps (no host sync per step); a NaN is still caught,
    with its own step number, and never saved in a training state."""
    from training import loop

    real_loss, calls = loop.compute_loss, []

    def nan_at_step_3(*args):
        loss = real_loss(*args)
        calls.append(1)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(loop, "compute_loss", nan_at_step_3)
    args = ["--train.output_dir", str(tmp_path), "--data.path", str(toy_data), "--data.resolution", "32", "--train.max_steps", "9",
            "--train.batch_size", "2", "--train.save_every", "4", "--train.log_every", "8", "--sample.every", "0",
            "--train.progress", "false", "--data.num_workers", "0", "--cache.use", "off"]
    with pytest.raises(FloatingPointError, match="loss is nan at step 3;"):
        main(args)
    assert len(calls) == 4  # found at the save step 4, before the state was written
    assert not (tmp_path / "state" / "step-00000004").exists()
