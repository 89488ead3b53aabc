"""``python -m training.run [--config file.yaml] [--key value ...] [--resume [state]]``

With no model files it runs the embedded default: scaled-down random-weight models with
SD1.5's layer layout and a generated toy dataset, then exports a checkpoint.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

from .adapter import IPAdapterModel, start_from_adapter_file
from .cache import open_cache
from .run_files import export_adapter, open_run, save_final_state, save_hook
from .cli import open_data, open_models, run_cli, setup_logging
from .config import Config, load_config, usage
from .data import DataPosition, make_loader
from .distributed import Engine, Process, check_same_weights, setup, teardown
from .loop import StepHook, epsilon_loss, train
from .models import resolve_dtype, seeded, text_encoder_names
from .variants import adapter_spec, export_name

log = logging.getLogger("training")

REAL_MODELS_HINT = """To train on the real models, point the run at your files (nothing is downloaded):
  python -m training.run --model.base /models/stable-diffusion-v1-5 \\
      --model.image_encoder /models/open_clip_vit_h14_laion2b.safetensors \\
      --data.path /data/pairs.jsonl --train.output_dir runs/my-adapter
(model.base is a diffusers folder or a single-file .safetensors of any family the trainer knows: which one is read
from the files; data.path a
.jsonl/.csv manifest, a folder of images with .txt captions, or WebDataset shards like 'shards/{00000..00099}.tar')"""


def main(argv: list[str] | None = None, extra_hooks: list[StepHook] | None = None) -> dict:
    """Run training; returns {"export": [paths], "history": [losses], "step": N}. Errors are one line."""
    argv = sys.argv[1:] if argv is None else argv
    setup_logging()
    config, flags = load_config(argv)
    if "help" in flags:
        print(usage())
        return {"export": [], "history": [], "step": 0}
    process = setup(config, flags)
    logging.getLogger("training").setLevel(logging.INFO if process.is_main else logging.WARNING)
    try:
        return _run(config, flags, process, extra_hooks or [])
    finally:
        teardown(process)


def _run(config: Config, flags: dict, process: Process, extra_hooks: list[StepHook]) -> dict:
    if config.family.training.prediction == "flow":  # the DiT families: training.dit
        from .dit import run_dit

        return run_dit(config, flags, process, extra_hooks)
    if config.embedded:
        log.info("No model files given: running the embedded default (scaled-down random-weight models, toy data).")
        log.info(REAL_MODELS_HINT)
    source = open_data(config, process.is_main, process.barrier)
    cache = open_cache(config, source, resolve_dtype(config.model.frozen_dtype, process.device))
    # from the cache the encoders serve only sample grids: not read without them, else kept off the accelerator
    unused = () if cache is None else ("image_encoder", *(text_encoder_names(config.family) if cache.text == "embeds" else ()))
    frozen = open_models(config, process.device, skip=() if config.sample.every else unused)
    encoder_embed_dim = frozen.image_encoder.embed_dim if frozen.image_encoder is not None else cache.image_embed_dim
    hidden_width = frozen.image_encoder.hidden_width if frozen.image_encoder is not None else cache.image_hidden_width
    spec = adapter_spec(config.model.variant, config.model.num_tokens, encoder_embed_dim, hidden_width, frozen.unet)
    with seeded(config.train.seed):  # the projection's initialisation; identical on every rank
        model = IPAdapterModel(frozen.unet, spec=spec)
    if config.model.init_adapter:  # a resumed training state replaces these weights below
        start_from_adapter_file(model, config.model.init_adapter)
        log.info("starting from the adapter weights of %s", config.model.init_adapter)
    if config.train.gradient_checkpointing:
        frozen.unet.enable_gradient_checkpointing()
    if cache is not None:
        frozen.empty_text, frozen.empty_pooled, frozen.zero_image = cache.empty_text, cache.empty_pooled, cache.zero_image
    frozen.to(process.device, offload=unused)
    model.to(process.device)
    log.info("trainable parameters: %s (%s %s adapter: %s %s + %d x to_k_ip/to_v_ip %s); frozen models in %s",
             f"{model.num_trainable():,}", spec.family, config.model.variant, type(model.image_proj).__name__,
             f"{sum(p.numel() for p in model.image_proj.parameters()):,}", len(spec.architecture.layers),
             f"{sum(p.numel() for p in model.layers.parameters()):,}", str(frozen.dtype).replace("torch.", ""))
    engine = Engine(model, config, process)

    start_step, position = open_run(config, flags, engine, process)
    data_position = DataPosition(config.data.num_workers, position)
    loader = make_loader(source, config.data.resolution, config.train.batch_size, config.train.seed,
                         process.rank, process.world_size, config.data.num_workers, position, cache=cache,
                         random_crop=config.data.crop == "random")
    exports: list[Path] = []
    hooks = [*_periodic_hooks(config, process, engine, frozen, source, data_position, exports, encoder_embed_dim), *extra_hooks]
    history = train(config, process, engine, loader, start_step, data_position, hooks,
                    epsilon_loss(config, frozen, engine, process.device))

    check_same_weights(process, model)
    final_step = save_final_state(config, process, engine, start_step, data_position)
    if process.is_main:
        exports.extend(_export(config, model, final_step, encoder_embed_dim))
        for path in exports[-len(config.train.export_formats):]:
            print(f"exported adapter: {path.resolve()}", flush=True)
        if config.embedded:
            print("This was the embedded toy run. " + REAL_MODELS_HINT, flush=True)
    return {"export": exports, "history": history, "step": final_step}


def _periodic_hooks(config, process, engine, frozen, source, data_position, exports, encoder_embed_dim) -> list[StepHook]:
    output_dir = Path(config.train.output_dir)
    train_config = config.train

    def export(step: int) -> None:
        if train_config.export_every and step % train_config.export_every == 0 and step != train_config.max_steps:
            if process.is_main:
                exports.extend(_export(config, engine.module, step, encoder_embed_dim))

    references = config.sample.images or ([p.image for p in source.pairs[:2]] if source.pairs else [])
    if config.sample.every and not references:
        log.info("samples: no grids; WebDataset data needs validation images in sample.images")

    def samples(step: int) -> None:
        if not (config.sample.every and step % config.sample.every == 0 and process.is_main and references):
            return
        from .sampling import sample_grid

        path = sample_grid(engine.module, frozen, references, config.sample.prompts, config.data.resolution,
                           config.sample.steps, config.sample.guidance, config.sample.seed,
                           output_dir / "samples" / f"step-{step:08d}.png")
        log.info("samples: %s", path)

    return [save_hook(config, process, engine, data_position), export, samples]


def _export(config: Config, model: IPAdapterModel, step: int, encoder_embed_dim: int) -> list[Path]:
    output_dir = Path(config.train.output_dir)
    paths = []
    for extension in config.train.export_formats:
        name = export_name(config.model.variant, step, model.spec.architecture, encoder_embed_dim)
        path = output_dir / f"{name}.{extension}"
        paths.append(export_adapter(model, path, step, config.to_yaml(), config.train.export_dtype, config.model.variant))
    return paths


def cli() -> int:
    return run_cli(main)


if __name__ == "__main__":
    sys.exit(cli())
