"""IP-Adapter checkpoint format: read, detect, validate and write.

Two files carry the same tensors:
- ``.bin``: a pickled nested dict ``{"image_proj": {...}, "ip_adapter": {...}}``;
- ``.safetensors``: the same, flattened to ``image_proj.proj.weight``,
  ``ip_adapter.1.to_k_ip.weight``, ...

XLabs' Flux adapter names the same parts its own way (``ip_adapter_proj_model.*``,
``double_blocks.{i}.processor.ip_adapter_double_stream_{k,v}_proj.*``); it is read into the
groups above and written back in its own names.

The FaceID adapters (faceid, faceid-plus/plusv2) also carry a LoRA in ``ip_adapter``:
``{key}.to_{q,k,v,out}_lora.{down,up}.weight`` on every attention processor, its key the processor's
position in diffusers' ``attn_processors`` (self-attention keys 0, 2, 4, ... included).

The family and the variant are read from the tensors, never from the file name.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from .files import atomic_path, read_weights
from .registry import VARIANTS, Family, Layer, Variant, encoder_of_widths, families, family_of_adapter_layers, variants_of
from .projection import FaceIDPlusProjection, LinearProjection, MLPProjection, MLPTokens, Resampler, TimeResampler

GROUP_ALIASES = {
    "image_proj": "image_proj",
    "image_proj_model": "image_proj",  # the reference trainer's module names
    "ip_adapter": "ip_adapter",
    "adapter_modules": "ip_adapter",
}
IGNORED_PREFIXES = ("unet.",)  # frozen UNet weights in a reference training state

OFFICIAL, XLABS = "ip-adapter", "xlabs"  # the key layouts a file can have
XLABS_PROJECTION = "ip_adapter_proj_model."
XLABS_LAYER = re.compile(r"double_blocks\.(\d+)\.processor\.ip_adapter_double_stream_([kv])_proj\.(weight|bias)$")

FULL_SIZE = "full size"  # base_width: the family's own (320)

# The FaceID LoRA: 8 tensors per attention processor (diffusers' LoRA attention processors, rank r)
LORA_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out")
LORA_TENSOR_NAMES = tuple(f"{projection}_lora.{part}.weight" for projection in LORA_PROJECTIONS for part in ("down", "up"))
LORA_TENSOR = re.compile(r"(\d+)\.(to_(?:q|k|v|out)_lora\.(?:down|up)\.weight)$")
FACE_ENCODER = "InsightFace ArcFace"  # what makes the face embeddings the FaceID adapters take
# projections whose tensors are those of another kind, told apart by their input: a face embedding's width (and
# the MLP ones by their token count and LoRA: faceid's 4 tokens with one, faceid-portrait's 16 without)
FACE_PROJECTIONS = {"mlp": ("faceid", "faceid-portrait"), "plus": ("faceid-resampler",)}


class AdapterFormatError(ValueError):
    """A file that is not a usable IP-Adapter for a known family; the message is one line."""


@dataclass(frozen=True)
class AdapterSpec:
    """What the tensors say about an adapter."""

    variant: str  # "base" (also light), "plus" (also plus-face), "full-face"; "xlabs", "instantx"; "faceid",
    # "faceid-plus" (also plusv2), "faceid-portrait", "faceid-portrait-unnorm"
    num_tokens: int | None  # image tokens per reference; None = one per encoder hidden state
    cross_attention_dim: int  # width of the image tokens
    encoder_input: str  # "image_embeds" (projected CLS, 1-d) or "penultimate" (hidden states); "face_embeds": no
    # CLIP features, the face embedding only (encoder_width is then the face embedding's width)
    encoder_width: int
    base_width: int  # width of the first UNet block (320 at full size); a DiT's hidden width
    resampler: dict = field(default_factory=dict)  # depth / heads / dim_head / dim for "plus"
    architecture: Family | None = None  # the model family, read from the layer keys
    projection: str = ""  # the projection's kind (Variant.projection); "" until the family is known
    layer_keys: tuple[int, ...] = ()  # the layers it carries (a DiT adapter may carry some blocks only)
    face_input: str = ""  # FaceID: "normed" or "raw" face embeddings (Variant.face_input); "": none
    face_width: int = 0  # FaceID: the face embedding's width
    lora_rank: int = 0  # FaceID: the rank of the LoRA it carries; 0: none

    @property
    def family(self) -> str:
        return self.architecture.name if self.architecture else "unknown family"

    @property
    def takes_faces(self) -> bool:
        return bool(self.face_width)

    @property
    def encoder_name(self) -> str:
        if self.encoder_input == "face_embeds":
            return FACE_ENCODER
        widths = {"embed_dim" if self.encoder_input == "image_embeds" else "hidden_width": self.encoder_width}
        encoder = encoder_of_widths(**widths)
        return encoder.name if encoder else "an unknown image encoder"

    def describe(self) -> str:
        tokens = self.num_tokens if self.num_tokens is not None else "per-patch"
        if not self.takes_faces:
            return f"{self.family} {self.variant} ({tokens} tokens, {self.encoder_name} {self.encoder_input} {self.encoder_width}-d)"
        inputs = f"{FACE_ENCODER} face embedding {self.face_width}-d"
        if self.encoder_input != "face_embeds":
            inputs += f" + {self.encoder_name} {self.encoder_input} {self.encoder_width}-d of the face crop"
        lora = f", LoRA rank {self.lora_rank}" if self.lora_rank else ""
        return f"{self.family} {self.variant} ({tokens} tokens, {inputs}{lora})"


@dataclass
class IPAdapterCheckpoint:
    image_proj: dict[str, torch.Tensor]
    ip_adapter: dict[str, torch.Tensor]
    spec: AdapterSpec
    source: str = "<memory>"
    metadata: dict[str, str] = field(default_factory=dict)
    layout: str = OFFICIAL  # the key names it is written back with

    @classmethod
    def from_state_dicts(
        cls,
        image_proj: dict[str, torch.Tensor],
        ip_adapter: dict[str, torch.Tensor],
        source: str = "<memory>",
        base_width: int | None | str = FULL_SIZE,
        metadata: dict[str, str] | None = None,
        architecture: Family | None = None,
        layout: str = OFFICIAL,
    ) -> "IPAdapterCheckpoint":
        image_proj = {str(k): v for k, v in image_proj.items()}
        ip_adapter = {str(k): v for k, v in ip_adapter.items()}
        spec = detect_spec(image_proj, ip_adapter, source, base_width, architecture)
        return cls(image_proj, ip_adapter, spec, source, dict(metadata or {}), layout)

    def layer_weights(self, key: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(to_k_ip, to_v_ip) weights of the layer with this official key."""
        return self.ip_adapter[f"{key}.to_k_ip.weight"], self.ip_adapter[f"{key}.to_v_ip.weight"]

    def lora_tensors(self) -> dict[int, dict[str, torch.Tensor]]:
        """A FaceID adapter's LoRA: processor key -> {``to_q_lora.down.weight``: ..., ...}; {} when it has none."""
        found: dict[int, dict[str, torch.Tensor]] = {}
        for name, tensor in self.ip_adapter.items():
            match = LORA_TENSOR.match(name)
            if match:
                found.setdefault(int(match.group(1)), {})[match.group(2)] = tensor
        return found

    def layer_tensors(self, key: int) -> dict[str, torch.Tensor]:
        """Every tensor of one layer, by its name inside the layer (``to_k_ip.weight``, ``norm_q.weight``...)."""
        prefix = f"{key}."
        return {name[len(prefix):]: tensor for name, tensor in self.ip_adapter.items() if name.startswith(prefix)}

    def build_projection(self) -> nn.Module:
        """The image projection module with this checkpoint's weights (strict keys), fp32 copies. Built on the
        meta device and given the tensors: no time spent initialising weights that are replaced (a FaceID plus
        SDXL perceiver has 190 M)."""
        with torch.device("meta"):
            module = build_projection(self.spec)
        tensors = {k: v.detach().to(torch.float32, copy=True) for k, v in self.image_proj.items()}
        module.load_state_dict(tensors, strict=True, assign=True)
        return module.eval().requires_grad_(False)

    def nested_state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        return {"image_proj": dict(self.image_proj), "ip_adapter": dict(self.ip_adapter)}

    def flat_state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors under the file names of its layout."""
        if self.layout == XLABS:
            flat = {f"{XLABS_PROJECTION}{k}": v for k, v in self.image_proj.items()}
            for name, tensor in self.ip_adapter.items():
                key, kind, parameter = re.match(r"(\d+)\.to_([kv])_ip\.(weight|bias)$", name).groups()
                flat[f"double_blocks.{key}.processor.ip_adapter_double_stream_{kind}_proj.{parameter}"] = tensor
            return flat
        flat = {f"image_proj.{k}": v for k, v in self.image_proj.items()}
        flat.update({f"ip_adapter.{k}": v for k, v in self.ip_adapter.items()})
        return flat

    def to(self, dtype: torch.dtype) -> "IPAdapterCheckpoint":
        def cast(group):
            return {k: v.to(dtype) if v.is_floating_point() else v for k, v in group.items()}

        return IPAdapterCheckpoint(cast(self.image_proj), cast(self.ip_adapter), self.spec, self.source, self.metadata,
                                   self.layout)

    def num_parameters(self) -> int:
        return sum(v.numel() for v in [*self.image_proj.values(), *self.ip_adapter.values()])


def build_projection(spec: AdapterSpec) -> nn.Module:
    projection = spec.projection or spec.variant
    if projection == "base":
        return LinearProjection(spec.encoder_width, spec.cross_attention_dim, spec.num_tokens)
    if projection == "full-face":
        return MLPProjection(spec.encoder_width, spec.cross_attention_dim)
    if projection in ("mlp", "faceid", "faceid-portrait"):
        return MLPTokens(spec.encoder_width, spec.resampler["hidden"], spec.cross_attention_dim, spec.num_tokens)
    if projection == "faceid-plus":
        r = spec.resampler
        return FaceIDPlusProjection(spec.face_width, r["hidden"], spec.num_tokens, r["dim"], r["depth"], r["dim_head"],
                                    r["heads"], spec.encoder_width, spec.cross_attention_dim, r["ff_mult"])
    if projection == "time-resampler":
        return TimeResampler(dim=spec.resampler["dim"], depth=spec.resampler["depth"], dim_head=spec.resampler["dim_head"],
                             heads=spec.resampler["heads"], num_queries=spec.num_tokens, hidden_width=spec.encoder_width,
                             output_dim=spec.cross_attention_dim, ff_mult=spec.resampler["ff_mult"],
                             timestep_width=spec.resampler["timestep_width"])
    return Resampler(
        dim=spec.resampler["dim"],
        depth=spec.resampler["depth"],
        dim_head=spec.resampler["dim_head"],
        heads=spec.resampler["heads"],
        num_queries=spec.num_tokens,
        hidden_width=spec.encoder_width,
        output_dim=spec.cross_attention_dim,
        ff_mult=spec.resampler["ff_mult"],
    )


# --- reading -----------------------------------------------------------------


def load_adapter(
    path: str | os.PathLike, base_width: int | None | str = FULL_SIZE, architecture: Family | None = None
) -> IPAdapterCheckpoint:
    """Read and validate an IP-Adapter file (``.bin``/``.pt``/``.pth`` or ``.safetensors``).

    The family (SD1.5, SDXL) is read from the layer keys; ``architecture`` refuses
    any other. ``base_width`` is the width of the UNet's first block (by default
    the family's full size, 320); ``None`` accepts a scaled-down copy of the
    layout (tests, toy models).
    """
    path = Path(path)
    name = path.name
    state_dict, metadata = read_state_dict(path)
    layout = XLABS if any(str(key).startswith(XLABS_PROJECTION) for key in state_dict) else OFFICIAL
    image_proj, ip_adapter = split_groups(state_dict, name)
    return IPAdapterCheckpoint.from_state_dicts(image_proj, ip_adapter, name, base_width, metadata, architecture, layout)


def read_state_dict(path: Path) -> tuple[dict, dict[str, str]]:
    """The raw (flat or nested) dict in a weights file, and its safetensors metadata."""
    return read_weights(path, "IP-Adapter", AdapterFormatError)


def split_groups(state_dict: dict, source: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Separate the ``image_proj`` and ``ip_adapter`` groups of a nested or flat dict."""
    groups: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
    unknown = []
    for key, value in state_dict.items():
        key = str(key)
        if isinstance(value, dict) and key in GROUP_ALIASES:
            groups[GROUP_ALIASES[key]].update({str(k): v for k, v in value.items()})
            continue
        prefix, _, rest = key.partition(".")
        xlabs_layer = XLABS_LAYER.match(key)
        if prefix in GROUP_ALIASES and rest and isinstance(value, torch.Tensor):
            groups[GROUP_ALIASES[prefix]][rest] = value
        elif key.startswith(XLABS_PROJECTION) and isinstance(value, torch.Tensor):
            groups["image_proj"][key[len(XLABS_PROJECTION):]] = value
        elif xlabs_layer and isinstance(value, torch.Tensor):
            index, kind, parameter = xlabs_layer.groups()
            groups["ip_adapter"][f"{index}.to_{kind}_ip.{parameter}"] = value
        elif not key.startswith(IGNORED_PREFIXES):
            unknown.append(key)
    if unknown or not groups["image_proj"] or not groups["ip_adapter"]:
        found = ", ".join(f"'{k}'" for k in (unknown or list(state_dict))[:3]) or "nothing"
        missing = [g for g in groups if not groups[g]]
        raise AdapterFormatError(
            f"'{source}' is not an IP-Adapter checkpoint: found keys like {found}"
            + (f" and no '{missing[0]}' group" if missing else "")
            + "; expected 'image_proj.*' and 'ip_adapter.*' tensors"
        )
    return groups["image_proj"], groups["ip_adapter"]


# --- detection and validation -----------------------------------------------


def detect_spec(
    image_proj: dict[str, torch.Tensor],
    ip_adapter: dict[str, torch.Tensor],
    source: str,
    base_width: int | None | str = FULL_SIZE,
    architecture: Family | None = None,
) -> AdapterSpec:
    layers = {name: tensor for name, tensor in ip_adapter.items() if not LORA_TENSOR.match(name)}
    lora = {name: tensor for name, tensor in ip_adapter.items() if name not in layers}
    spec = _face_projection(_detect_projection(image_proj, source), spec_layer_keys(layers))
    family, variant = _detect_family(layers, spec.projection, source, lora, spec.num_tokens)
    spec = replace(spec, projection=variant.projection) if spec.takes_faces else spec  # faceid or faceid-portrait
    if architecture is not None and family is not architecture:
        raise AdapterFormatError(
            f"'{source}' is an {family.name} adapter ({len(spec_layer_keys(layers))} layers, image tokens "
            f"{spec.cross_attention_dim} wide); expected an {architecture.name} adapter "
            f"({len(architecture.layers)} layers, {architecture.token_width} wide)"
        )
    full_size = base_width == FULL_SIZE
    # a scaled-down DiT (tests, toy models) scales its token width too; a UNet's stays the text encoder's
    if (full_size or family.attach.is_unet) and spec.cross_attention_dim != family.token_width:
        raise AdapterFormatError(
            f"'{source}' makes image tokens {spec.cross_attention_dim} wide; "
            f"expected {family.token_width}, the {family.name} "
            f"{'cross-attention' if family.attach.is_unet else 'image-token'} width"
        )
    width = family.base_width if full_size else base_width
    found_base = _validate_layers(layers, family, variant, spec.cross_attention_dim, source, width)
    rank = _validate_lora(lora, family, variant, found_base, source)
    named = not family.attach.is_unet or variant.takes_faces  # else the projection's name (light: base)
    return AdapterSpec(**{**spec.__dict__, "variant": variant.name if named else spec.variant,
                          "base_width": found_base, "architecture": family,
                          "layer_keys": tuple(family.preset_keys(variant.layers)), "face_input": variant.face_input,
                          "lora_rank": rank})


def spec_layer_keys(ip_adapter: dict[str, torch.Tensor]) -> list[int]:
    """The layer keys an ``ip_adapter`` group carries (``7.to_k_ip.weight`` -> 7)."""
    return sorted({int(name.split(".", 1)[0]) for name in ip_adapter if name.split(".", 1)[0].isdigit()})


def _detect_family(ip_adapter: dict[str, torch.Tensor], projection: str, source: str,
                   lora: dict[str, torch.Tensor] | None = None, tokens: int | None = None) -> tuple[Family, Variant]:
    """The family (from the layer keys) and the variant (from the projection; a FaceID one also from its token
    count and whether it carries a LoRA) of an adapter's ``ip_adapter`` layers (``lora``: its LoRA tensors)."""
    keys = spec_layer_keys(ip_adapter)
    matches = family_of_adapter_layers(keys)
    kinds = next((kinds for kinds in FACE_PROJECTIONS.values() if projection == kinds[0]), (projection,))
    fitting = [(family, variant) for family, variant in matches if variant.projection in kinds]
    if fitting and fitting[0][1].takes_faces:
        return _face_variant(fitting, bool(lora), tokens, projection, source)
    if lora:
        faceid = ", ".join(v.name for v in VARIANTS if v.lora)
        raise AdapterFormatError(
            f"'{source}' carries LoRA tensors (ip_adapter.{next(iter(lora))}) beside a {projection} projection; "
            f"expected a LoRA only in a FaceID adapter ({faceid}: a projection of an InsightFace face embedding)")
    if fitting:
        return fitting[0]
    if matches:
        family = matches[0][0]
        offered = ", ".join(sorted({f"{v.name} ({v.projection})" for v in variants_of(family)}))
        raise AdapterFormatError(f"'{source}' has {family.name} layers but a {projection} projection; expected one of "
                                 f"{family.name}'s adapters: {offered}")
    options = "; ".join(f"{f.name}: {', '.join(f'{len(f.preset_keys(v.layers))} ({v.name})' for v in variants_of(f))}"
                        for f in families())
    found = f"keys {keys[0]}..{keys[-1]}" if keys else "no numbered layers"
    raise AdapterFormatError(
        f"'{source}' carries image layers for {len(keys)} layers ({found}); expected the layer count of a known "
        f"family's adapter ({options})"
    )


def _face_variant(fitting: list[tuple[Family, Variant]], has_lora: bool, tokens: int | None, projection: str,
                  source: str) -> tuple[Family, Variant]:
    """Among FaceID variants of one projection: the one with this token count and with (or without) a LoRA."""
    chosen = [(family, variant) for family, variant in fitting
              if variant.lora == has_lora and variant.tokens in (None, tokens)]
    if chosen:
        return chosen[0]
    family = fitting[0][0]
    offered = "; ".join(dict.fromkeys(f"{v.name}: {v.tokens} tokens, {'with a' if v.lora else 'no'} LoRA"
                                      for _, v in fitting))
    raise AdapterFormatError(
        f"'{source}' is a FaceID adapter ({projection} projection of an InsightFace face embedding) that makes {tokens} "
        f"tokens and carries {'a' if has_lora else 'no'} LoRA; expected one of {family.name}'s: {offered}")


def attention_processors(family: Family, base_width: int | None = None) -> dict[int, tuple[str, Layer, int, int]]:
    """Every attention processor of a UNet family by its official key, its position in diffusers'
    ``attn_processors``: (diffusers module, the layer of its transformer block, width, width of its key/value
    inputs). A transformer block's self-attention (``attn1``) runs just before its cross-attention layer, so its
    key is the layer's key - 1; its keys and values read the block's own width, the layer's the text context."""
    base = family.base_width if base_width is None else base_width
    processors = {}
    for layer in family.layers:
        width = layer.width_multiplier * base
        processors[layer.key - 1] = (layer.diffusers_name.rsplit(".", 1)[0] + ".attn1", layer, width, width)
        processors[layer.key] = (layer.diffusers_name, layer, width, family.context_dim)
    return dict(sorted(processors.items()))


def _validate_lora(lora: dict[str, torch.Tensor], family: Family, variant: Variant, base_width: int,
                   source: str) -> int:
    """A FaceID LoRA has the 8 tensors of one rank on every attention processor, in its shapes; returns the rank."""
    if not variant.lora:
        return 0
    processors = attention_processors(family, base_width)
    found: dict[int, dict[str, torch.Tensor]] = {}
    for name, tensor in lora.items():
        key, tensor_name = LORA_TENSOR.match(name).groups()
        found.setdefault(int(key), {})[tensor_name] = tensor
    extra = sorted(set(found) - set(processors))
    if extra:
        raise AdapterFormatError(f"'{source}': the LoRA has attention processor key {extra[0]}, which {family.name} "
                                 f"lacks; expected keys 0..{max(processors)} ({family.name} {variant.name})")
    first = min(processors)
    rank = tuple(found.get(first, {}).get("to_q_lora.down.weight", torch.empty(0, 0)).shape)[0]
    for key, (module, _, width, kv_width) in processors.items():
        names = set(found.get(key, {}))
        if names != set(LORA_TENSOR_NAMES):
            missing, unexpected = sorted(set(LORA_TENSOR_NAMES) - names), sorted(names - set(LORA_TENSOR_NAMES))
            what = f"lacks {missing[0]}" if missing else f"has an unexpected {unexpected[0]}"
            raise AdapterFormatError(
                f"'{source}': the LoRA of attention processor {key} ({module}) {what}; expected "
                f"to_{{q,k,v,out}}_lora.{{down,up}}.weight on each of {family.name}'s {len(processors)} attention "
                f"processors ({variant.name})")
        for projection in LORA_PROJECTIONS:
            inputs = kv_width if projection in ("to_k", "to_v") else width
            for part, shape in (("down", (rank, inputs)), ("up", (width, rank))):
                tensor_name = f"{projection}_lora.{part}.weight"
                shape_found = tuple(found[key][tensor_name].shape)
                if shape_found != shape:
                    raise AdapterFormatError(
                        f"'{source}': ip_adapter.{key}.{tensor_name} is {list(shape_found)}, expected {list(shape)} "
                        f"({family.name} {module}, LoRA rank {rank}"
                        + (f", base width {base_width})" if base_width != family.base_width else ")"))
    return rank


def _face_projection(spec: AdapterSpec, layer_keys: list[int]) -> AdapterSpec:
    """A projection whose tensors are another kind's (an MLP, a Resampler) but whose input is as wide as a FaceID
    variant's face embedding, on the layers of a family that has such a variant, is a FaceID projection: the first
    of its kinds (the variant picks among them)."""
    kinds = FACE_PROJECTIONS.get(spec.projection, ())
    if spec.encoder_width not in {variant.face_width for _, variant in family_of_adapter_layers(layer_keys)
                                  if variant.projection in kinds}:
        return spec
    return replace(spec, variant=kinds[0], projection=kinds[0], encoder_input="face_embeds",
                   face_width=spec.encoder_width)


def _shape(tensors: dict[str, torch.Tensor], key: str, source: str) -> tuple[int, ...]:
    if key not in tensors:
        raise AdapterFormatError(f"'{source}': image_proj.{key} is missing; expected it for this projection type")
    return tuple(tensors[key].shape)


def _detect_projection(image_proj: dict[str, torch.Tensor], source: str) -> AdapterSpec:
    keys = set(image_proj)
    if keys == {"proj.weight", "proj.bias", "norm.weight", "norm.bias"}:
        out_features, encoder_width = _shape(image_proj, "proj.weight", source)
        (cross,) = _shape(image_proj, "norm.weight", source)
        if out_features % cross or _shape(image_proj, "proj.bias", source) != (out_features,):
            raise AdapterFormatError(
                f"'{source}': image_proj.proj.weight is [{out_features}, {encoder_width}]; "
                f"expected [tokens x {cross}, encoder width]"
            )
        return AdapterSpec("base", out_features // cross, cross, "image_embeds", encoder_width, 0, projection="base")
    if keys == {"proj.0.weight", "proj.0.bias", "proj.2.weight", "proj.2.bias", "norm.weight", "norm.bias"}:
        hidden, encoder_width = _shape(image_proj, "proj.0.weight", source)
        out_features = _shape(image_proj, "proj.2.weight", source)[0]
        (cross,) = _shape(image_proj, "norm.weight", source)
        if out_features % cross or _shape(image_proj, "proj.2.weight", source)[1] != hidden:
            raise AdapterFormatError(f"'{source}': image_proj.proj.2.weight is {list(image_proj['proj.2.weight'].shape)}; "
                                     f"expected [tokens x {cross}, {hidden}]")
        return AdapterSpec("mlp", out_features // cross, cross, "image_embeds", encoder_width, 0, {"hidden": hidden},
                           projection="mlp")
    if {"proj.0.weight", "proj.2.weight", "proj.3.weight"} <= keys:
        hidden, encoder_width = _shape(image_proj, "proj.0.weight", source)
        (cross,) = _shape(image_proj, "proj.3.weight", source)
        if _shape(image_proj, "proj.2.weight", source) != (cross, hidden):
            raise AdapterFormatError(f"'{source}': image_proj.proj.2.weight does not join [{hidden}] to [{cross}]")
        return AdapterSpec("full-face", None, cross, "penultimate", encoder_width, 0, projection="full-face")
    if "perceiver_resampler.proj_in.weight" in keys:
        return _detect_faceid_plus(image_proj, source)
    if "latents" in keys and "proj_in.weight" in keys:
        _, num_queries, dim = _shape(image_proj, "latents", source)
        _, encoder_width = _shape(image_proj, "proj_in.weight", source)
        (cross,) = _shape(image_proj, "norm_out.weight", source)
        depth = len({k.split(".")[1] for k in keys if re.match(r"layers\.\d+\.0\.to_q\.weight$", k)})
        inner_dim = _shape(image_proj, "layers.0.0.to_q.weight", source)[0]
        ff_inner = _shape(image_proj, "layers.0.1.1.weight", source)[0]
        resampler = {"dim": dim, "depth": depth, "dim_head": 64, "heads": inner_dim // 64, "ff_mult": ff_inner // dim}
        if "time_embedding.linear_1.weight" in keys:
            resampler["timestep_width"] = _shape(image_proj, "time_embedding.linear_1.weight", source)[1]
            return AdapterSpec("time-resampler", num_queries, cross, "penultimate", encoder_width, 0, resampler,
                               projection="time-resampler")
        return AdapterSpec("plus", num_queries, cross, "penultimate", encoder_width, 0, resampler, projection="plus")
    found = ", ".join(sorted(keys)[:4])
    raise AdapterFormatError(
        f"'{source}': unknown image projection (keys {found}); expected a Linear+LayerNorm (base/light, XLabs), "
        "Resampler (plus/plus-face, SD3.5 InstantX, FaceID portrait unnorm), MLP (full-face), MLP+LayerNorm (Flux "
        "InstantX, FaceID, FaceID portrait) or MLP+LayerNorm+perceiver (FaceID plus) projection"
    )


def _detect_faceid_plus(image_proj: dict[str, torch.Tensor], source: str) -> AdapterSpec:
    """faceid-plus / plusv2: ``proj`` + ``norm`` make id tokens from the face embedding, ``perceiver_resampler``
    refines them with the CLIP hidden states of the face crop (heads of 64, as the reference and diffusers have)."""
    prefix = "perceiver_resampler."
    hidden, face_width = _shape(image_proj, "proj.0.weight", source)
    out_features, hidden_in = _shape(image_proj, "proj.2.weight", source)
    (dim,) = _shape(image_proj, "norm.weight", source)
    perceiver_dim, encoder_width = _shape(image_proj, prefix + "proj_in.weight", source)
    (cross,) = _shape(image_proj, prefix + "norm_out.weight", source)
    if hidden_in != hidden or out_features % dim or perceiver_dim != dim:
        raise AdapterFormatError(
            f"'{source}': image_proj.proj.2.weight is [{out_features}, {hidden_in}] and perceiver_resampler.proj_in "
            f"makes {perceiver_dim}; expected [tokens x {dim}, {hidden}] and {dim} (the id tokens are the perceiver's "
            "latents)")
    depth = len({k.split(".")[2] for k in image_proj if re.match(r"perceiver_resampler\.layers\.\d+\.0\.to_q\.weight$", k)})
    inner_dim = _shape(image_proj, prefix + "layers.0.0.to_q.weight", source)[0]
    ff_inner = _shape(image_proj, prefix + "layers.0.1.1.weight", source)[0]
    resampler = {"dim": dim, "depth": depth, "dim_head": 64, "heads": inner_dim // 64, "ff_mult": ff_inner // dim,
                 "hidden": hidden}
    return AdapterSpec("faceid-plus", out_features // dim, cross, "penultimate", encoder_width, 0, resampler,
                       projection="faceid-plus", face_width=face_width)


def _validate_layers(ip_adapter: dict[str, torch.Tensor], family: Family, variant: Variant, cross: int, source: str,
                     base_width: int | None) -> int:
    """Every layer carries the variant's tensors in the family's shapes; returns the base width found."""
    layers = [family.layer_by_key[key] for key in family.preset_keys(variant.layers)]
    first = layers[0]
    if base_width is None:
        base_width = ip_adapter[f"{first.key}.to_k_ip.weight"].shape[0] // first.width_multiplier
    expected_names = set(variant.layer_tensors)
    for layer in layers:
        names = {name.split(".", 1)[1] for name in ip_adapter if name.split(".", 1)[0] == str(layer.key)}
        if names != expected_names:
            missing, extra = sorted(expected_names - names), sorted(names - expected_names)
            found = f"lacks {missing[0]}" if missing else f"has an unexpected {extra[0]}"
            raise AdapterFormatError(f"'{source}': ip_adapter layer {layer.key} {found}; expected "
                                     f"{', '.join(variant.layer_tensors)} per layer ({family.name} {variant.name})")
        width = layer.width_multiplier * base_width
        for name, shape in variant.layer_shapes(width, cross).items():
            found = tuple(ip_adapter[f"{layer.key}.{name}"].shape)
            if shape is not None and found != shape:
                raise AdapterFormatError(
                    f"'{source}': ip_adapter.{layer.key}.{name} is {list(found)}, expected {list(shape)} "
                    f"({family.name} layer {layer.diffusers_name}"
                    + (f", base width {base_width})" if base_width != family.base_width else ")")
                )
    return base_width


def check_encoder(spec: AdapterSpec, embed_dim: int, hidden_width: int, source: str, encoder_name: str) -> None:
    """Refuse an encoder whose output the adapter's projection cannot take (a FaceID adapter without CLIP input
    takes any: it reads face embeddings only)."""
    if spec.encoder_input == "face_embeds":
        return
    found = embed_dim if spec.encoder_input == "image_embeds" else hidden_width
    if found != spec.encoder_width:
        kind = "image embeddings" if spec.encoder_input == "image_embeds" else "hidden states"
        raise AdapterFormatError(
            f"'{source}' expects {spec.encoder_name} {kind} of width {spec.encoder_width}, "
            f"but the image encoder ({encoder_name}) gives {found}"
        )


# --- writing -------------------------------------------------------------------


def save_adapter(
    checkpoint: IPAdapterCheckpoint,
    path: str | os.PathLike,
    dtype: torch.dtype | None = torch.float16,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write the official layout; ``.safetensors`` is flat, anything else a nested ``.bin``.

    The file appears atomically: an existing file at ``path`` stays intact until
    the new one is complete.
    """
    path = Path(path)
    if dtype is not None:
        checkpoint = checkpoint.to(dtype)
    with atomic_path(path) as temporary:
        if path.suffix == ".safetensors":
            tensors = {k: v.contiguous() for k, v in checkpoint.flat_state_dict().items()}
            meta = {**checkpoint.metadata, **(metadata or {})}
            save_file(tensors, str(temporary), metadata={str(k): str(v) for k, v in meta.items()} or None)
        else:
            torch.save(checkpoint.nested_state_dict(), temporary)
    return path


def _natural(key: str):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", key)]
