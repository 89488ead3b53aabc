"""Training configuration: dataclass defaults (the paper's values), YAML files, CLI overrides.

Precedence, lowest first: the dataclass defaults, ``configs/embedded.yaml`` (only when
no model files are given), the ``--config`` file, then ``--key value`` /
``--section.key value`` on the command line.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ipadapter.files import write_text_atomic

from ipadapter.registry import trainable_families, trainable_variants, variant_by_name

from .errors import UserError

CONFIG_DIR = Path(__file__).parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "default.yaml"
EMBEDDED_CONFIG = CONFIG_DIR / "embedded.yaml"


class ConfigError(UserError):
    """A config file or command-line option that cannot be used; the message is one line."""


@dataclass
class ModelConfig:
    base: str | None = None  # the base model: a diffusers folder or single-file .safetensors/.ckpt; its family is detected
    family: str | None = None  # the embedded run builds this family (configs/embedded.yaml); with model.base, detected
    image_encoder: str | None = None  # the image encoder's weights (one the family's adapters use), open_clip or transformers keys
    variant: str = "base"  # one of the trainable variants of ipadapter.registry (base, plus, plus-face, full-face)
    num_tokens: int | None = None  # image tokens; None = the variant's (base 4, plus 16); full-face: one per hidden state
    encoder_embed_dim: int | None = None  # image embedding width the encoder must give; None: one of the family's encoders'
    frozen_dtype: str = "auto"  # auto = bf16 on GPUs that have it, else fp16; fp32 on CPU
    init_adapter: str | None = None  # start from this adapter file (official .bin/.safetensors or an export)


@dataclass
class DataConfig:
    path: str | None = None  # manifest (.jsonl/.csv), image folder, or tar shards ("a/{00000..00099}.tar")
    format: str = "auto"  # auto | manifest | folder | webdataset
    resolution: int | None = None  # None: the family's
    crop: str = "center"  # center | random (time ids, where the family has them, record the crop; random crops are encoded online)
    drop_image: float = 0.05
    drop_text: float = 0.05
    drop_both: float = 0.05
    num_workers: int = 4
    image_column: str = "auto"  # manifest column with the image path
    caption_column: str = "auto"  # manifest column with the caption


@dataclass
class OptimConfig:
    lr: float = 1.0e-4
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1.0e-8


@dataclass
class TrainConfig:
    batch_size: int = 8  # per device
    max_steps: int = 1_000_000
    seed: int = 42
    output_dir: str = "runs/ip-adapter"
    save_every: int = 2000  # training state, for --resume
    keep_states: int = 2
    export_every: int = 10000
    export_formats: list = field(default_factory=lambda: ["safetensors", "bin"])
    export_dtype: str = "fp16"
    log_every: int = 10
    progress: bool = True
    gradient_checkpointing: bool = False  # recompute the frozen model's blocks in the backward pass: less memory, more time


@dataclass
class SampleConfig:
    every: int = 5000  # 0 disables the sample grid
    prompts: list = field(default_factory=lambda: ["best quality, high quality", "a photo in the style of the image"])
    images: list = field(default_factory=list)  # validation image files; empty = the first images of the data
    steps: int = 50
    guidance: float = 7.5
    seed: int = 0


@dataclass
class CacheConfig:
    use: str = "auto"  # auto: train from a matching cache if there is one, else encode online; off; require
    dir: str | None = None  # default: next to the data (<manifest>.cache/, <folder>.cache/, <shard folder>/ipadapter-cache/)
    text: str = "embeds"  # embeds: text-encoder outputs; ids: token ids only (the text encoder runs every step)
    shard_size: int = 1000  # samples per cache shard for manifests and folders (WebDataset: one per tar)
    encode_batch: int = 16  # images per encoder call in `python -m training.cache`


@dataclass
class DistributedConfig:
    strategy: str = "auto"  # auto | single | ddp | deepspeed
    zero_stage: int = 2
    backend: str = "auto"  # auto = nccl on GPUs, gloo on CPU


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    @property
    def embedded(self) -> bool:
        """True when no model files are given: scaled-down random models (see ``configs/embedded.yaml``)."""
        return self.base_model is None and self.model.image_encoder is None

    @property
    def base_model(self) -> str | None:
        return self.model.base

    @property
    def family(self):
        """The model family's registry entry (``ipadapter.registry``)."""
        from ipadapter.registry import family_by_id

        return family_by_id(self.model.family)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> Path:
        return write_text_atomic(path, self.to_yaml())


SECTIONS = {f.name: f for f in dataclasses.fields(Config)}


def _field_types(section: object) -> dict[str, object]:
    hints = typing.get_type_hints(type(section))
    return {f.name: hints[f.name] for f in dataclasses.fields(section)}


def coerce(value: object, annotation: object, name: str) -> object:
    """``value`` (from YAML or the command line) as the field's type; one-line error otherwise."""
    args = typing.get_args(annotation)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), annotation) if args else annotation
    if isinstance(value, str) and value.strip().lower() in ("null", "none", "~") and optional:
        return None
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{name} is null; expected a {getattr(base, '__name__', base)}")
    try:
        if base is bool:
            if isinstance(value, str):
                lowered = value.strip().lower()
                if lowered not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                    raise ValueError(value)
                return lowered in ("true", "1", "yes", "on")
            return bool(value)
        if base is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if base is float:
            return float(value)
        if base is list or typing.get_origin(base) is list:
            if isinstance(value, str):
                parsed = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
                value = parsed if parsed is not None else []
            if not isinstance(value, (list, tuple)):
                raise ValueError(value)
            return list(value)
        if base is str:
            if isinstance(value, (dict, list)):
                raise ValueError(value)
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} = {value!r}; expected {getattr(base, '__name__', base)}") from None
    return value


def apply(config: Config, overrides: dict, origin: str) -> Config:
    """Set ``section.key`` values from a (nested or dotted) dict; unknown keys are an error."""
    for dotted, value in flatten(overrides).items():
        section_name, key = resolve_key(dotted, origin)
        section = getattr(config, section_name)
        setattr(section, key, coerce(value, _field_types(section)[key], f"{section_name}.{key} ({origin})"))
    return config


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    flat = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and str(key) in SECTIONS and not prefix:
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


# options of earlier versions, and what replaced them
REPLACED_OPTIONS = {"model.sd15": "model.base", "model.sdxl": "model.base"}


def resolve_key(dotted: str, origin: str) -> tuple[str, str]:
    """``section.key`` as given, or a bare ``key`` that names exactly one field of one section."""
    dotted = dotted.replace("-", "_")
    replaced = REPLACED_OPTIONS.get(dotted if "." in dotted else f"model.{dotted}")
    if replaced:
        raise ConfigError(f"option '{dotted}' in {origin} is now {replaced} (the family is read from the model's files); "
                          f"expected --{replaced} PATH")
    if "." in dotted:
        section_name, _, key = dotted.partition(".")
        if section_name in SECTIONS and key in _field_types(getattr(Config(), section_name)):
            return section_name, key
        raise ConfigError(f"unknown option '{dotted}' in {origin}; expected one of: {', '.join(all_keys())}")
    matches = [name for name in SECTIONS if dotted in _field_types(getattr(Config(), name))]
    if len(matches) == 1:
        return matches[0], dotted
    if len(matches) > 1:
        raise ConfigError(f"option '{dotted}' in {origin} is ambiguous; write it as one of {[f'{m}.{dotted}' for m in matches]}")
    raise ConfigError(f"unknown option '{dotted}' in {origin}; expected one of: {', '.join(all_keys())}")


def all_keys() -> list[str]:
    return [f"{name}.{key}" for name in SECTIONS for key in _field_types(getattr(Config(), name))]


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist; expected a YAML file")
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"config file '{path}' is not valid YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file '{path}' holds a {type(loaded).__name__}; expected a mapping of sections")
    return loaded


def parse_cli(argv: list[str]) -> tuple[str | None, dict[str, object], dict[str, str]]:
    """Split ``argv`` into the ``--config`` file, field overrides and run flags (``--resume``)."""
    config_file, overrides, flags = None, {}, {}
    index = 0
    while index < len(argv):
        token = argv[index]
        if token == "-h":
            flags["help"] = "true"
            index += 1
            continue
        if not token.startswith("--"):
            raise ConfigError(f"unexpected argument '{token}'; expected --key value or --section.key value")
        name, has_value, inline = token[2:].partition("=")
        following = argv[index + 1] if index + 1 < len(argv) and not argv[index + 1].startswith("--") else None
        value = inline if has_value else following
        consumed = 1 + (0 if has_value or following is None else 1)
        if name == "help":
            flags["help"] = "true"
        elif name == "config":
            if value is None:
                raise ConfigError("--config needs a YAML file path")
            config_file = value
        elif name == "resume":
            flags["resume"] = value if value is not None else "latest"
        elif name in ("local_rank", "local-rank"):  # added by the deepspeed launcher
            flags["local_rank"] = value or "0"
        else:
            if value is None:
                value = "true"  # a bare --flag sets a boolean
            overrides[name] = value
        index += consumed
    return config_file, overrides, flags


def load_config(argv: list[str] | None = None) -> tuple[Config, dict[str, str]]:
    """The effective config and the run flags for a command line."""
    config_file, overrides, flags = parse_cli(list(argv or []))
    user_file = read_yaml(config_file) if config_file else {}
    origin = f"'{config_file}'" if config_file else None

    def build(with_embedded: bool) -> Config:
        config = apply(Config(), read_yaml(DEFAULT_CONFIG), f"'{DEFAULT_CONFIG.name}'")
        if with_embedded:
            apply(config, read_yaml(EMBEDDED_CONFIG), f"'{EMBEDDED_CONFIG.name}'")
        if user_file:
            apply(config, user_file, origin)
        return apply(config, overrides, "the command line")

    config = build(False)
    if config.embedded:
        config = build(True)
    validate(config)
    config.model.family = resolve_family(config).id
    if config.data.resolution is None:
        config.data.resolution = config.family.training.resolution
    validate_resolution(config)
    check_variant(config)
    return config, flags


def dit_variant_names() -> tuple[str, ...]:
    return tuple(dict.fromkeys(name for family in trainable_families() for name in family.training.variants))


def offered_variants(family) -> tuple[str, ...]:
    """The variants the trainer makes for ``family``: a DiT family's entry names them; UNet families take every
    trainable variant made for them."""
    from ipadapter.registry import VARIANTS

    return tuple(family.training.variants) or tuple(dict.fromkeys(v.name for v in VARIANTS if v.trainable and v.serves(family)))


def check_variant(config: Config) -> None:
    """The variant must be one made for the base model's family; sets model.num_tokens to its default."""
    family, variant = config.family, config.model.variant
    where = f"model.base '{Path(config.base_model).name}'" if config.base_model else f"model.family {family.id}"
    if variant not in offered_variants(family):
        others = [f.name for f in trainable_families() if variant in offered_variants(f)]
        raise ConfigError(f"model.variant {variant} trains {' and '.join(others)} adapters, but {where} is an "
                          f"{family.name} model; expected one of {', '.join(offered_variants(family))}")
    if config.embedded and family not in embedded_families():
        raise ConfigError(f"the embedded toy run builds {' and '.join(f.name for f in embedded_families())} only; "
                          f"expected model.base and model.image_encoder for {family.name}")
    dit = family.training.variants.get(variant)
    if dit is not None and dit.tokens:
        if config.model.num_tokens is None:
            config.model.num_tokens = dit.tokens[0]
        elif config.model.num_tokens not in dit.tokens:
            raise ConfigError(f"model.num_tokens = {config.model.num_tokens} for {family.name} {variant}; expected "
                              f"{' or '.join(map(str, dit.tokens))}")
    if config.model.num_tokens is None:
        config.model.num_tokens = variant_by_name(variant, family).tokens


def embedded_families() -> tuple:
    """The families the embedded toy run builds: the UNet ones (a DiT family's entry names its own variants)."""
    return tuple(family for family in trainable_families() if not family.training.variants)


def resolve_family(config: Config):
    """The family of the base model, read from its files; the embedded run's is ``model.family``."""
    from ipadapter.registry import family_by_id, families

    if config.base_model is None:
        if config.model.family is None:
            raise ConfigError("model.family is not set; expected one of "
                              f"{', '.join(f.id for f in embedded_families())} for the embedded run (or model.base)")
        return family_by_id(config.model.family)
    from .base_models import detect_family

    family = detect_family(config.base_model)  # a missing or unrecognised model: a one-line ModelFileError
    if config.model.family not in (None, family.id):
        raise ConfigError(f"model.family = {config.model.family}, but model.base '{Path(config.base_model).name}' is "
                          f"an {family.name} model; expected model.family {family.id} (or leave it out)")
    return family


def validate(config: Config) -> None:
    choices = {
        "model.variant": (config.model.variant, (*trainable_variants(), *dit_variant_names())),
        "model.frozen_dtype": (config.model.frozen_dtype, ("auto", "bf16", "fp16", "fp32")),
        "model.family": (config.model.family, (None, *(family.id for family in trainable_families()))),
        "data.crop": (config.data.crop, ("center", "random")),
        "data.format": (config.data.format, ("auto", "manifest", "folder", "webdataset")),
        "distributed.strategy": (config.distributed.strategy, ("auto", "single", "ddp", "deepspeed")),
        "distributed.backend": (config.distributed.backend, ("auto", "nccl", "gloo")),
        "train.export_dtype": (config.train.export_dtype, ("fp16", "bf16", "fp32")),
        "cache.use": (config.cache.use, ("auto", "off", "require")),
        "cache.text": (config.cache.text, ("embeds", "ids")),
    }
    for name, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"{name} = '{value}'; expected one of {', '.join(str(a) for a in allowed if a is not None)}")
    bad_formats = set(config.train.export_formats) - {"safetensors", "bin"}
    if bad_formats:
        raise ConfigError(f"train.export_formats has {sorted(bad_formats)}; expected safetensors and/or bin")
    if (config.base_model is None) != (config.model.image_encoder is None):
        given, missing = ("model.base", "model.image_encoder") if config.model.image_encoder is None \
            else ("model.image_encoder", "model.base")
        raise ConfigError(f"{given} is set but {missing} is not; give both (real models) or neither (embedded toy run)")
    drops = config.data.drop_image + config.data.drop_text + config.data.drop_both
    if min(config.data.drop_image, config.data.drop_text, config.data.drop_both) < 0 or drops > 1:
        raise ConfigError(f"condition drop probabilities sum to {drops:g} or are negative; expected each >= 0 and a sum <= 1")
    if config.model.variant == "full-face" and config.model.num_tokens is not None:
        raise ConfigError(f"model.num_tokens = {config.model.num_tokens} with model.variant full-face; expected null "
                          "(full-face makes one token per hidden state of the encoder)")
    for name in ("train.batch_size", "train.max_steps", "train.log_every", "model.num_tokens", "sample.steps",
                 "cache.shard_size", "cache.encode_batch"):
        section, key = name.split(".")
        value = getattr(getattr(config, section), key)
        if value is not None and value < 1:  # None: model.num_tokens left to the variant
            raise ConfigError(f"{name} = {getattr(getattr(config, section), key)}; expected a positive number")
    for name in ("data.num_workers", "train.save_every", "train.export_every", "sample.every", "train.keep_states"):
        section, key = name.split(".")
        if getattr(getattr(config, section), key) < 0:
            raise ConfigError(f"{name} = {getattr(getattr(config, section), key)}; expected 0 or more")


def validate_resolution(config: Config) -> None:
    if config.data.resolution < 1 or config.data.resolution % 8:
        raise ConfigError(f"data.resolution = {config.data.resolution}; expected a positive multiple of 8 (the VAE's downsampling)")


def usage() -> str:
    lines = [
        "usage: python -m training.run [--config file.yaml] [--section.key value ...] [--resume [state folder]]",
        "",
        "Without model files (model.base and model.image_encoder) it runs the embedded toy default.",
        "Options (default):",
    ]
    defaults = Config()
    for name in SECTIONS:
        for key in _field_types(getattr(defaults, name)):
            lines.append(f"  --{name}.{key} {getattr(getattr(defaults, name), key)!r}")
    return "\n".join(lines)
