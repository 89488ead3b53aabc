"""What ``training.run``, ``training.cache`` and ``training.eval`` share when they start: logging, the
exit status of user errors, the device, and opening the data and (the needed parts of) the frozen models."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch

from ipadapter.adapter_file import AdapterFormatError
from ipadapter.encoder import EncoderFormatError

from .config import Config
from .data import describe_skips, open_source, write_toy_dataset
from .errors import UserError
from .models import FrozenModels, build_embedded_models, load_frozen_models, resolve_dtype

log = logging.getLogger("training")
NOISY_LOGGERS = ("diffusers", "transformers", "DeepSpeed", "torch.distributed")


def setup_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(message)s", level=logging.WARNING)
    log.setLevel(logging.INFO)
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.ERROR)


def run_cli(entry) -> int:
    """Exit status of a command-line entry point: 2 with a one-line ``error: ...`` for the user's mistakes."""
    try:
        entry()
    except (UserError, AdapterFormatError, EncoderFormatError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def local_device(local_rank: int = 0) -> torch.device:
    """This process's accelerator (``cuda:LOCAL_RANK``) if there is one, else the CPU."""
    return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")


def open_data(config: Config, is_main: bool = True, barrier=lambda: None):
    """The run's data source, checked before anything is loaded; the embedded default writes its toy data first."""
    if config.embedded and config.data.path is None:
        toy = Path(config.train.output_dir) / "toy_data"
        if is_main:
            write_toy_dataset(toy, seed=config.train.seed)
        barrier()
        config.data.path = str(toy)
    source = open_source(config.data.path, config.data.format, config.data.image_column, config.data.caption_column)
    skipped = source.scan_skipped
    log.info("data: %s%s", source.description,
             f"; skipped {sum(skipped.values())} rows ({describe_skips(skipped)})" if skipped else "")
    return source


def open_models(config: Config, device: torch.device, skip: tuple[str, ...] = ()) -> FrozenModels:
    """The frozen models of the run, without the modules named in ``skip`` (``unet``, a text encoder's folder name,
    ``image_encoder``): those are not read from the user's files."""
    dtype = resolve_dtype(config.model.frozen_dtype, device)
    if not config.embedded:
        return load_frozen_models(config.base_model, config.model.image_encoder, dtype, config.family,
                                  config.model.encoder_embed_dim, skip)
    frozen = build_embedded_models(config.family, seed=config.train.seed, dtype=dtype)
    for name in skip:
        if name in frozen.text_encoders:
            frozen.text_encoders[name] = None
        else:
            setattr(frozen, name, None)
    return frozen
