"""The DiT trainer from ``training.cache`` (tiny random Flux.1 and SD3.5, CPU): the cache pass stores the text
encoders', image encoder's and VAE's outputs; a run from it loads only the transformer and takes the online run's
steps; a cache from another image encoder is not used, in one line."""
from __future__ import annotations

import pytest

from devtools.dit_models import write_tiny_clip_encoder
from dit_training_fixtures import COMMON, SIGLIP_WIDTH, files  # noqa: F401 (files: a fixture)
from training.cache import CacheError
from training.config import ConfigError
from training.cache import main as cache_pass
from training.run import main

CASES = {"xlabs": ("flux", "clip", 32, ["--model.num_tokens", "4"]), "instantx": ("sd35", "siglip", SIGLIP_WIDTH, [])}


def args(files, variant, output, *extra):
    base, encoder, width, own = CASES[variant]
    return ["--model.base", str(files[base]), "--model.image_encoder", str(files[encoder]), "--model.encoder_embed_dim",
            str(width), "--model.variant", variant, "--data.path", str(files["data"]), "--train.output_dir", str(output),
            "--train.export_formats", "safetensors", *COMMON, *own, *extra]


@pytest.mark.parametrize("variant", list(CASES))
def test_a_run_from_the_cache_loads_only_the_transformer_and_takes_the_online_steps(files, tmp_path, variant):
    cache = ["--cache.dir", str(tmp_path / "cache"), "--cache.encode_batch", "4"]
    summary = cache_pass(args(files, variant, tmp_path / "pass", *cache))
    assert summary["complete"] and summary["written"] == 1
    online = main(args(files, variant, tmp_path / "online", "--cache.use", "off"))
    cached = main(args(files, variant, tmp_path / "cached", *cache, "--cache.use", "require"))
    parts = cached["parts"]
    assert parts.vae is None and parts.text_encoders == {} and parts.transformer is not None
    assert online["parts"].vae is not None  # the online run encodes
    # the same drops, noise levels and noise; the encoders ran in batches of 4 for the cache, of 2 online
    assert len(cached["history"]) == 2
    assert all(abs(a - b) <= 1e-5 * abs(b) for a, b in zip(cached["history"], online["history"])), \
        (cached["history"], online["history"])


def test_a_cache_from_another_image_encoder_is_not_used_and_says_so_in_one_line(files, tmp_path):
    cache = ["--cache.dir", str(tmp_path / "cache")]
    cache_pass(args(files, "xlabs", tmp_path / "pass", *cache))
    other = write_tiny_clip_encoder(tmp_path / "other-clip.safetensors", seed=1)
    run = args(files, "xlabs", tmp_path / "run", *cache, "--cache.use", "require", "--model.image_encoder", str(other))
    with pytest.raises(CacheError) as error:
        main(run)
    message = str(error.value)
    assert message.count("\n") == 0 and "was built for other image encoder files" in message, message
    assert "run python -m training.cache" in message


def test_token_ids_instead_of_text_outputs_is_one_line(files, tmp_path):
    with pytest.raises(ConfigError) as error:
        cache_pass(args(files, "xlabs", tmp_path, "--cache.text", "ids"))
    assert str(error.value) == ("cache.text = ids for Flux.1; expected embeds (the text encoders' outputs: a DiT run "
                                "from the cache loads no text encoder)")
