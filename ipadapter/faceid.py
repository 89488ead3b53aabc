"""FaceID adapters: face embeddings -> image tokens, and their LoRA as data. No ComfyUI here
(``comfyui_glue/faceid_lora.py`` applies the LoRA to a ComfyUI model).

What the released adapters compute (tencent-ailab/IP-Adapter's ``ip_adapter_faceid*.py``, diffusers'
``IPAdapterFaceID*ImageProjection``, cubiq's ComfyUI_IPAdapter_plus):

* faceid: the L2-normalised ArcFace embedding [512] -> MLP (512 -> 1024 -> 4 x width) -> LayerNorm -> 4 tokens;
* faceid-plus / plusv2: those 4 id tokens are the latents of a perceiver that reads the CLIP penultimate hidden
  states of the aligned face crop; v1 keeps the perceiver's output, v2 adds it to the id tokens:
  ``id_tokens + s * out``, s (cubiq's ``weight_faceidv2``) chosen when the adapter is applied;
* faceid-portrait: faceid's MLP making 16 tokens per face; several faces are side by side (concat);
* faceid-portrait-unnorm (SDXL): the plus Resampler over InsightFace's unnormalised embedding, 16 tokens.

The unconditional input is a zero face embedding (and, for plus, the CLIP features of a blank image or of the
negative image). faceid and faceid-plus also carry a LoRA on every attention processor of the UNet
(self-attention too): ``W' = W + strength x up @ down`` on to_q, to_k, to_v and to_out.0, which is what the
reference's LoRA attention processors compute at scale 1 and what ComfyUI's LoRA loaders apply from the released
``<adapter>_lora.safetensors`` sidecars (``lora_unet_<diffusers attention>_<to_q|to_k|to_v|to_out_0>``
``.lora_{down,up}.weight``).

The API:

* ``faceid_embeds(faces, clip)``: ``EncodedImages`` from ``faces.FaceEmbeds`` (and, for the plus adapters, the
  image encoder's features of ``faces.crops``); Save/Load Embeds and combine keep the face embeddings;
* ``image_prompt.image_tokens`` / ``tokens_per_reference`` route a FaceID checkpoint to ``face_tokens`` here
  (``shortcut_scale``: plusv2's s);
* ``variant_of(checkpoint)``: the registry row (faceid-plusv2 is told from faceid-plus by its name, as cubiq does);
  ``face_crop_size(variant, family)``: the crop size to ask ``FaceAnalyzer.embed_faces`` for;
* ``FaceIDLoRA``: the LoRA of a checkpoint (``from_checkpoint``) or of a sidecar file (``load_lora_sidecar``), with
  ``find_lora_sidecar`` / ``save_lora_sidecar``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path, PurePath

import torch
from safetensors.torch import save_file

from .adapter_file import (
    FACE_ENCODER,
    LORA_PROJECTIONS,
    AdapterFormatError,
    IPAdapterCheckpoint,
    attention_processors,
    check_encoder,
)
from .files import atomic_path, read_weights
from .image_prompt import EncodedImages, combine_features
from .registry import VARIANTS, Family, Variant, families, variant_by_name, variants_of

LORA_SIDECAR_SUFFIX = "_lora.safetensors"  # the released sidecar of <stem>.bin: <stem>_lora.safetensors
KOHYA_PREFIX = "lora_unet_"
FACE_WIDTHS = tuple(sorted({variant.face_width for variant in VARIANTS if variant.takes_faces}))


# --- face embeddings -> tokens ---------------------------------------------------------


def variant_of(checkpoint: IPAdapterCheckpoint) -> Variant:
    """The registry row of a checkpoint. The tensors tell faceid, faceid-plus, faceid-portrait and
    faceid-portrait-unnorm apart; faceid-plusv2 has faceid-plus's tensors and is told by its name ("plusv2" in
    it, cubiq's rule), so a renamed v2 file runs as v1 (no shortcut) unless the caller passes a shortcut scale."""
    spec = checkpoint.spec
    if not spec.takes_faces:
        return variant_by_name(spec.variant, spec.architecture)
    candidates = [variant for variant in variants_of(spec.architecture)
                  if variant.projection == spec.projection and variant.face_input == spec.face_input
                  and variant.lora == bool(spec.lora_rank) and variant.tokens in (None, spec.num_tokens)]
    name = PurePath(checkpoint.source.replace("\\", "/")).name.lower()
    worded = [variant for variant in candidates if variant.name_word and variant.name_word in name]
    plain = [variant for variant in candidates if not variant.name_word]
    return (worded or plain or candidates)[0]


def face_crop_size(variant: Variant, family: Family) -> int | None:
    """The size of the aligned face crop this FaceID variant shows the image encoder for this family (cubiq:
    224 for SD1.5, 256 for SDXL); None: the face analysis' default (``faces.DEFAULT_CROP_SIZE``)."""
    return variant.face_crop_sizes.get(family.id)


def shortcut_of(checkpoint: IPAdapterCheckpoint, shortcut_scale: float | None = None) -> float | None:
    """The s of ``id_tokens + s * out`` for this checkpoint, None where its tokens take no shortcut: plusv2 takes
    ``shortcut_scale`` (None: 1.0); plus v1 and the FaceID adapters without a perceiver take none, whatever
    ``shortcut_scale`` says (as cubiq's ``weight_faceidv2``)."""
    if checkpoint.spec.projection != "faceid-plus" or not variant_of(checkpoint).shortcut:
        return None
    return 1.0 if shortcut_scale is None else float(shortcut_scale)


def faceid_embeds(faces, clip: EncodedImages | None = None) -> EncodedImages:
    """FaceID embeds from ``faces`` (an ``ipadapter.faces.FaceEmbeds``, or anything with ``embeds`` [N, 512]
    normalised and ``raw_embeds`` or ``norms``) and, for the plus adapters, ``clip``: the image encoder's
    encoding of ``faces.crops`` (one crop per face; its unconditional features those of a blank or negative
    image). Without ``clip`` the embeds serve faceid and faceid-portrait only."""
    embeds = torch.as_tensor(faces.embeds).float()
    raw = getattr(faces, "raw_embeds", None)
    if raw is None:
        raw = embeds * torch.as_tensor(faces.norms).float()[:, None]
    raw = torch.as_tensor(raw).float()
    if embeds.dim() != 2 or embeds.shape[0] == 0 or embeds.shape[-1] not in FACE_WIDTHS or raw.shape != embeds.shape:
        raise ValueError(f"the face embeddings have shape {list(embeds.shape)} (raw {list(raw.shape)}); expected "
                         f"[faces, {' or '.join(map(str, FACE_WIDTHS))}] {FACE_ENCODER} embeddings, one per face")
    count = embeds.shape[0]
    if clip is None:
        return EncodedImages(torch.zeros(count, 0), torch.zeros(count, 0, 0), None, None, FACE_ENCODER, embeds, raw)
    if len(clip) != count:
        raise ValueError(f"{len(clip)} encoded face crops for {count} faces; expected the image encoder's "
                         "features of each face's crop (FaceEmbeds.crops)")
    return EncodedImages(clip.image_embeds, clip.penultimate, clip.uncond_image_embeds, clip.uncond_penultimate,
                         clip.encoder_name, embeds, raw)


def project_faces(checkpoint: IPAdapterCheckpoint, projection: torch.nn.Module, face: torch.Tensor,
                  hidden_states: torch.Tensor | None = None, shortcut: float | None = None) -> torch.Tensor:
    """Face embeddings [N, width] (and the crops' CLIP hidden states [N, T, hidden] for faceid-plus) -> tokens
    [N, tokens, token width]. ``shortcut``: plusv2's s (``shortcut_of``); None: the perceiver's output alone."""
    kind = checkpoint.spec.projection
    with torch.no_grad():
        if kind == "faceid-plus":
            return projection(face, hidden_states, shortcut)
        if kind == "faceid-resampler":
            return projection(face[:, None])  # the face embedding as a sequence of one
        return projection(face)


def face_tokens(
    checkpoint: IPAdapterCheckpoint,
    projection: torch.nn.Module,
    images: EncodedImages,
    default_uncond_penultimate: torch.Tensor | None,
    combine: str | None = "concat",
    shortcut_scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A FaceID adapter's conditional and unconditional tokens. ``combine``: concat (every face's tokens side by
    side, [1, N x tokens, width], the portrait adapters' several faces) or a mode merging the faces' embeddings
    (and crop features) into one reference ([1, tokens, width]); None: each face's own tokens [N, tokens, width]
    (one per latent). The unconditional tokens come from a zero face embedding (and the blank / negative image's
    CLIP features for faceid-plus), [1, tokens, width] (concat: repeated per face)."""
    spec, source = checkpoint.spec, checkpoint.source
    if len(images) == 0:
        raise ValueError("the image prompt holds no face; expected at least one reference face")
    if not images.has_faces:
        raise ValueError(f"'{source}' is a FaceID adapter ({spec.variant}) that takes {FACE_ENCODER} face embeddings, "
                         f"and these embeds hold {images.encoder_name} image features only; expected embeds made "
                         "from faces (ipadapter.faceid.faceid_embeds)")
    face = images.raw_face_embeds if spec.face_input == "raw" else images.face_embeds
    if face.shape[-1] != spec.face_width:
        raise AdapterFormatError(f"'{source}' expects {FACE_ENCODER} face embeddings of width {spec.face_width}, "
                                 f"but the embeds hold face embeddings of width {face.shape[-1]}")
    parameter = next(projection.parameters())
    face = face.to(parameter)
    hidden = uncond_hidden = None
    if spec.encoder_input == "penultimate":
        if not images.has_clip_features:
            raise ValueError(f"'{source}' ({spec.variant}) also reads the {spec.encoder_name} hidden states of the "
                             "aligned face crops, and these embeds hold face embeddings only; expected "
                             "faceid_embeds(faces, clip=the image encoder's encoding of faces.crops)")
        check_encoder(spec, images.image_embeds.shape[-1], images.penultimate.shape[-1], source, images.encoder_name)
        hidden = images.penultimate.to(parameter)
        uncond_hidden = images.uncond_penultimate if images.uncond_penultimate is not None else default_uncond_penultimate
        if uncond_hidden is None:
            raise ValueError(f"'{source}' ({spec.variant}) needs the encoder's output for a blank image")
        uncond_hidden = uncond_hidden.to(parameter).mean(dim=0, keepdim=True)
    shortcut = shortcut_of(checkpoint, shortcut_scale)
    uncond = project_faces(checkpoint, projection, torch.zeros_like(face[:1]), uncond_hidden, shortcut)
    if combine is None:
        return project_faces(checkpoint, projection, face, hidden, shortcut), uncond
    if combine == "concat":
        cond = project_faces(checkpoint, projection, face, hidden, shortcut)
        return cond.reshape(1, -1, cond.shape[-1]), uncond.repeat(1, len(images), 1)
    merged_hidden = combine_features(hidden, combine) if hidden is not None else None
    return project_faces(checkpoint, projection, combine_features(face, combine), merged_hidden, shortcut), uncond


# --- the LoRA --------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class LoRAWeight:
    """The LoRA of one linear layer of one attention processor: ``W' = W + strength x up @ down``."""

    key: int  # the attention processor's official key (its position in diffusers' attn_processors)
    module: str  # the attention's diffusers module, e.g. down_blocks.0.attentions.0.transformer_blocks.0.attn1
    projection: str  # to_q, to_k, to_v or to_out (diffusers' to_out.0)
    down: torch.Tensor  # [rank, in]
    up: torch.Tensor  # [out, rank]

    @property
    def linear(self) -> str:
        """The diffusers module path of the linear layer it changes."""
        return f"{self.module}.{'to_out.0' if self.projection == 'to_out' else self.projection}"

    @property
    def kohya_name(self) -> str:
        """Its name in the released sidecar (kohya's diffusers-path naming, which ComfyUI's LoRA loader maps)."""
        return KOHYA_PREFIX + self.linear.replace(".", "_")

    def delta(self) -> torch.Tensor:
        return self.up.float() @ self.down.float()


@dataclass(frozen=True, eq=False)
class FaceIDLoRA:
    """A FaceID adapter's LoRA: one ``LoRAWeight`` per linear layer of every attention processor."""

    family: Family
    weights: tuple[LoRAWeight, ...]
    source: str = "<memory>"

    @property
    def rank(self) -> int:
        return self.weights[0].down.shape[0]

    @classmethod
    def from_checkpoint(cls, checkpoint: IPAdapterCheckpoint) -> "FaceIDLoRA":
        spec = checkpoint.spec
        if not spec.lora_rank:
            offered = ", ".join(variant.name for variant in VARIANTS if variant.lora)
            raise ValueError(f"'{checkpoint.source}' ({spec.variant}) carries no LoRA; expected one of {offered}")
        tensors = checkpoint.lora_tensors()
        weights = tuple(
            LoRAWeight(key, module, projection, tensors[key][f"{projection}_lora.down.weight"],
                       tensors[key][f"{projection}_lora.up.weight"])
            for key, (module, *_) in attention_processors(spec.architecture, spec.base_width).items()
            for projection in LORA_PROJECTIONS)
        return cls(spec.architecture, weights, checkpoint.source)

    def kohya_state_dict(self) -> dict[str, torch.Tensor]:
        """The released sidecar's tensors: ``<kohya name>.lora_down.weight`` / ``.lora_up.weight`` (no alpha:
        scale 1, as the adapter's own LoRA)."""
        tensors = {}
        for weight in self.weights:
            tensors[f"{weight.kohya_name}.lora_down.weight"] = weight.down
            tensors[f"{weight.kohya_name}.lora_up.weight"] = weight.up
        return tensors

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """Its tensors as an adapter file's ``ip_adapter`` group holds them."""
        tensors = {}
        for weight in self.weights:
            tensors[f"{weight.key}.{weight.projection}_lora.down.weight"] = weight.down
            tensors[f"{weight.key}.{weight.projection}_lora.up.weight"] = weight.up
        return tensors

    @classmethod
    def from_kohya(cls, tensors: dict[str, torch.Tensor], source: str = "<memory>",
                   family: Family | None = None) -> "FaceIDLoRA":
        """Read a sidecar's tensors; the family is the one whose attention layers they name, all of them. An
        ``alpha`` per layer (absent from the released files) scales its up weight by alpha / rank, as ComfyUI
        does."""
        layers: dict[str, dict[str, torch.Tensor]] = {}
        for name, tensor in tensors.items():
            base, _, part = name.partition(".")
            if not base.startswith(KOHYA_PREFIX) or part not in ("lora_down.weight", "lora_up.weight", "alpha"):
                raise AdapterFormatError(
                    f"'{source}' holds '{name}'; expected a FaceID LoRA's lora_unet_<attention>_<to_q|to_k|to_v|to_out_0>"
                    ".lora_{down,up}.weight tensors")
            layers.setdefault(base, {})[part] = tensor
        candidates = [family] if family is not None else [f for f in families() if f.attach.is_unet]
        tables = {f: {w[0]: w for w in _kohya_table(f)} for f in candidates}
        chosen = next((f for f, table in tables.items() if set(table) == set(layers)), None)
        if chosen is None:
            expected = "; ".join(f"{f.name}: {len(table)} layers" for f, table in tables.items())
            example = sorted(set(layers) - set(tables[candidates[0]]))[:1] or sorted(set(tables[candidates[0]]) - set(layers))[:1]
            raise AdapterFormatError(
                f"'{source}' holds a LoRA of {len(layers)} layers (e.g. {example[0] if example else 'none'}) that is not "
                f"the FaceID LoRA of {' or '.join(f.name for f in candidates)}; expected every attention projection "
                f"of the UNet ({expected})")
        weights = []
        for base, (_, key, module, projection) in tables[chosen].items():
            parts = layers[base]
            if "lora_down.weight" not in parts or "lora_up.weight" not in parts:
                missing = "lora_down.weight" if "lora_down.weight" not in parts else "lora_up.weight"
                raise AdapterFormatError(f"'{source}' lacks {base}.{missing}; expected lora_down and lora_up per layer")
            down, up = parts["lora_down.weight"], parts["lora_up.weight"]
            if down.dim() != 2 or up.dim() != 2 or up.shape[1] != down.shape[0]:
                raise AdapterFormatError(f"'{source}': {base} has lora_down {list(down.shape)} and lora_up "
                                         f"{list(up.shape)}; expected [rank, in] and [out, rank]")
            if "alpha" in parts:
                up = up * (float(parts["alpha"]) / down.shape[0])
            weights.append(LoRAWeight(key, module, projection, down, up))
        return cls(chosen, tuple(weights), source)


def _kohya_table(family: Family) -> list[tuple[str, int, str, str]]:
    """(kohya name, processor key, module, projection) of every linear layer a FaceID LoRA changes."""
    table = []
    for key, (module, *_) in attention_processors(family).items():
        for projection in LORA_PROJECTIONS:
            probe = LoRAWeight(key, module, projection, torch.empty(0), torch.empty(0))
            table.append((probe.kohya_name, key, module, projection))
    return table


# --- the sidecar file ---------------------------------------------------------------


def lora_sidecar_name(adapter_name: str | os.PathLike) -> str:
    """``ip-adapter-faceid_sd15.bin`` -> ``ip-adapter-faceid_sd15_lora.safetensors``."""
    return PurePath(str(adapter_name).replace("\\", "/")).stem + LORA_SIDECAR_SUFFIX


def find_lora_sidecar(adapter_path: str | os.PathLike, folders=()) -> Path | None:
    """The sidecar of an adapter file by its name: beside the adapter first, then in ``folders`` (ComfyUI's
    models/loras, where cubiq's loader looks); a name differing only in case counts. None where there is none."""
    name = lora_sidecar_name(adapter_path)
    for folder in (Path(adapter_path).parent, *map(Path, folders)):
        exact = folder / name
        if exact.is_file():
            return exact
        if folder.is_dir():
            found = sorted(path for path in folder.iterdir() if path.name.lower() == name.lower() and path.is_file())
            if found:
                return found[0]
    return None


def save_lora_sidecar(lora: FaceIDLoRA, path: str | os.PathLike, dtype: torch.dtype | None = torch.float16) -> Path:
    """Write the LoRA in the released sidecar layout (safetensors), atomically."""
    path = Path(path)
    tensors = {name: (tensor.to(dtype) if dtype is not None else tensor).contiguous()
               for name, tensor in lora.kohya_state_dict().items()}
    with atomic_path(path) as temporary:
        save_file(tensors, str(temporary), metadata={"format": "pt", "faceid_lora_of": lora.source,
                                                       "model_family": lora.family.name})
    return path


def load_lora_sidecar(path: str | os.PathLike, family: Family | None = None) -> FaceIDLoRA:
    """Read a ``_lora.safetensors`` sidecar (the released layout, or ours); ``family`` refuses any other."""
    path = Path(path)
    tensors, _ = read_weights(path, "FaceID LoRA", AdapterFormatError)
    return FaceIDLoRA.from_kohya({str(k): v for k, v in tensors.items()}, path.name, family)
