"""From encoder features to the per-layer image keys and values.

The encoder's features (not the projected tokens) are what an image prompt
stores, so one encoding serves any adapter made for that encoder.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .adapter_file import IPAdapterCheckpoint, check_encoder
from .choices import COMBINE_MODES
from .dit_attention import dit_keys_values


def combine_features(features: torch.Tensor, mode: str) -> torch.Tensor:
    """Several references' features [N, ...] as one [1, ...] (every mode but concat).

    average / add: the mean / sum; subtract: the first minus the mean of the others;
    norm average: the mean of the references scaled to equal length (each feature vector
    L2-normalised over its last axis), at their mean length, so that one reference with
    large features does not outweigh the others.
    """
    if mode not in COMBINE_MODES or mode == "concat":
        raise ValueError(f"combine mode '{mode}' cannot merge features; expected one of {', '.join(COMBINE_MODES[:1] + COMBINE_MODES[2:])}")
    if mode == "average" or features.shape[0] == 1:
        return features.mean(dim=0, keepdim=True)
    if mode == "add":
        return features.sum(dim=0, keepdim=True)
    if mode == "subtract":
        return features[:1] - features[1:].mean(dim=0, keepdim=True)
    norms = features.norm(dim=-1, keepdim=True)
    return (features / norms.clamp_min(1e-12)).mean(dim=0, keepdim=True) * norms.mean(dim=0, keepdim=True)


FACE_TENSORS = ("face_embeds", "raw_face_embeds")


@dataclass
class EncodedImages:
    """Encoder features of reference images and of their unconditional counterpart.

    ``image_embeds`` [N, embed_dim] is the projected CLS token (base adapters);
    ``penultimate`` [N, tokens, hidden] the second-to-last hidden states (plus,
    full-face). ``uncond_*`` hold one entry each: a negative image's features,
    or None for the reference's own unconditional input.

    FaceID references (``ipadapter.faceid.faceid_embeds``) also hold each face's identity embedding:
    ``face_embeds`` [N, 512] L2-normalised, ``raw_face_embeds`` [N, 512] unnormalised (portrait unnorm); their
    CLIP features are those of the aligned face crops, or [N, 0] / [N, 0, 0] when no image encoder saw them
    (faceid and faceid-portrait read the face embedding only). Their unconditional face input is zeros.
    ``shortcut_scale``: faceid-plusv2's s, chosen where the faces are encoded (None: 1; other adapters ignore it).
    """

    image_embeds: torch.Tensor
    penultimate: torch.Tensor
    uncond_image_embeds: torch.Tensor | None = None
    uncond_penultimate: torch.Tensor | None = None
    encoder_name: str = "image encoder"
    face_embeds: torch.Tensor | None = None
    raw_face_embeds: torch.Tensor | None = None
    shortcut_scale: float | None = None

    def __len__(self) -> int:
        return self.image_embeds.shape[0]

    @property
    def has_faces(self) -> bool:
        return self.face_embeds is not None

    @property
    def has_clip_features(self) -> bool:
        return self.image_embeds.shape[-1] > 0 and self.penultimate.shape[-1] > 0

    def state_dict(self) -> dict[str, torch.Tensor]:
        tensors = {"image_embeds": self.image_embeds, "penultimate": self.penultimate}
        if self.uncond_image_embeds is not None:
            tensors["uncond_image_embeds"] = self.uncond_image_embeds
            tensors["uncond_penultimate"] = self.uncond_penultimate
        if self.has_faces:
            tensors.update({name: getattr(self, name) for name in FACE_TENSORS})
        if self.shortcut_scale is not None:
            tensors["shortcut_scale"] = torch.tensor(float(self.shortcut_scale))
        return {k: v.contiguous().cpu() for k, v in tensors.items()}

    @classmethod
    def from_state_dict(cls, tensors: dict[str, torch.Tensor], encoder_name: str, source: str) -> "EncodedImages":
        if "image_embeds" not in tensors or "penultimate" not in tensors:
            found = ", ".join(sorted(tensors)[:4]) or "nothing"
            raise ValueError(f"'{source}' holds {found}; expected saved image embeddings (image_embeds, penultimate)")
        faces = [name for name in FACE_TENSORS if name in tensors]
        if faces and len(faces) < len(FACE_TENSORS):
            missing = next(name for name in FACE_TENSORS if name not in tensors)
            raise ValueError(f"'{source}' holds {faces[0]} but no {missing}; expected both face tensors of FaceID "
                             "embeds, or neither")
        return cls(
            tensors["image_embeds"],
            tensors["penultimate"],
            tensors.get("uncond_image_embeds"),
            tensors.get("uncond_penultimate"),
            encoder_name,
            tensors.get("face_embeds"),
            tensors.get("raw_face_embeds"),
            float(tensors["shortcut_scale"]) if "shortcut_scale" in tensors else None,
        )

    def weighted(self, weights: list[float]) -> "EncodedImages":
        """Each reference's features times its weight (one weight per image, or one for all)."""
        if len(weights) not in (1, len(self)):
            raise ValueError(f"{len(weights)} image weights for {len(self)} images; expected one or one per image")
        factor = torch.tensor(weights, dtype=self.image_embeds.dtype)
        faces = [getattr(self, name) * factor[:, None].to(getattr(self, name)) if self.has_faces else None
                 for name in FACE_TENSORS]
        return EncodedImages(self.image_embeds * factor[:, None], self.penultimate * factor[:, None, None],
                             self.uncond_image_embeds, self.uncond_penultimate, self.encoder_name, *faces,
                             self.shortcut_scale)

    def concatenated(self, other: "EncodedImages") -> "EncodedImages":
        if self.has_faces != other.has_faces:
            raise ValueError("one of the embeds holds face embeddings (FaceID) and the other does not; expected "
                             "embeds of one kind")
        faces = [torch.cat([getattr(self, name), getattr(other, name).to(getattr(self, name))]) if self.has_faces
                 else None for name in FACE_TENSORS]
        return EncodedImages(
            torch.cat([self.image_embeds, other.image_embeds.to(self.image_embeds)]),
            torch.cat([self.penultimate, other.penultimate.to(self.penultimate)]),
            self.uncond_image_embeds,
            self.uncond_penultimate,
            self.encoder_name,
            *faces,
            self.shortcut_scale,
        )


def combine_embeds(parts: list[EncodedImages], mode: str) -> EncodedImages:
    """Several encodings as one: concat keeps every reference, the other modes merge them into one."""
    if not parts:
        raise ValueError("no embeds to combine; expected at least one")
    names = {part.encoder_name for part in parts}
    widths = {(part.image_embeds.shape[-1], part.penultimate.shape[-1]) for part in parts}
    if len(widths) > 1:
        raise ValueError(f"the embeds come from encoders of different widths {sorted(widths)} ({', '.join(sorted(names))}); "
                         "expected embeds of one image encoder")
    combined = parts[0]
    for part in parts[1:]:
        combined = combined.concatenated(part)
    if mode == "concat":
        return combined
    faces = [combine_features(getattr(combined, name), mode) if combined.has_faces else None for name in FACE_TENSORS]
    return EncodedImages(combine_features(combined.image_embeds, mode), combine_features(combined.penultimate, mode),
                         combined.uncond_image_embeds, combined.uncond_penultimate, combined.encoder_name, *faces,
                         combined.shortcut_scale)


def image_tokens(
    checkpoint: IPAdapterCheckpoint,
    projection: torch.nn.Module,
    images: EncodedImages,
    default_uncond_penultimate: torch.Tensor | None,
    combine: str = "average",
    shortcut_scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Conditional and unconditional image tokens, each [1, tokens, context width].

    The unconditional input follows the reference implementation: a zero
    embedding for base adapters, the encoder's features of an all-zero
    (normalised) image for the others, unless a negative image was encoded.
    A FaceID adapter reads the face embeddings (zeros for the unconditional half; ``ipadapter.faceid``);
    ``shortcut_scale``: faceid-plusv2's s (None: 1).
    """
    if combine not in COMBINE_MODES:
        raise ValueError(f"combine mode '{combine}' is unknown; expected one of {', '.join(COMBINE_MODES)}")
    if checkpoint.spec.takes_faces:
        from .faceid import face_tokens

        return face_tokens(checkpoint, projection, images, default_uncond_penultimate, combine, shortcut_scale)
    cond, uncond = _features(checkpoint, projection, images, default_uncond_penultimate)
    with torch.no_grad():
        if combine == "concat":
            cond_tokens = projection(cond).reshape(1, -1, checkpoint.spec.cross_attention_dim)
        else:
            cond_tokens = projection(combine_features(cond, combine))
        uncond_tokens = projection(uncond.mean(dim=0, keepdim=True))
        if combine == "concat":
            uncond_tokens = uncond_tokens.repeat(1, len(images), 1)
    return cond_tokens, uncond_tokens


def tokens_per_reference(
    checkpoint: IPAdapterCheckpoint,
    projection: torch.nn.Module,
    images: EncodedImages,
    default_uncond_penultimate: torch.Tensor | None,
    shortcut_scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each reference's own tokens [N, tokens, width], and the unconditional ones [1, tokens, width]."""
    if checkpoint.spec.takes_faces:
        from .faceid import face_tokens

        return face_tokens(checkpoint, projection, images, default_uncond_penultimate, None, shortcut_scale)
    cond, uncond = _features(checkpoint, projection, images, default_uncond_penultimate)
    with torch.no_grad():
        return projection(cond), projection(uncond.mean(dim=0, keepdim=True))


def projection_inputs(
    checkpoint: IPAdapterCheckpoint,
    projection: torch.nn.Module,
    images: EncodedImages,
    default_uncond_penultimate: torch.Tensor | None,
    combine: str = "average",
) -> tuple[torch.Tensor, torch.Tensor]:
    """What the projection takes, for a projection that also takes the step (SD3.5 InstantX's Resampler): the
    conditional features [N, ...] (concat: every reference, to be projected one by one; else merged into one) and
    the unconditional ones [1, ...]."""
    if combine not in COMBINE_MODES:
        raise ValueError(f"combine mode '{combine}' is unknown; expected one of {', '.join(COMBINE_MODES)}")
    cond, uncond = _features(checkpoint, projection, images, default_uncond_penultimate)
    if combine != "concat":
        cond = combine_features(cond, combine)
    return cond, uncond.mean(dim=0, keepdim=True)


def _features(checkpoint, projection, images, default_uncond_penultimate):
    """The projection's conditional and unconditional inputs, on its device and dtype."""
    if len(images) == 0:
        raise ValueError("the image prompt holds no image; expected at least one reference image")
    spec = checkpoint.spec
    if spec.takes_faces:
        raise ValueError(f"'{checkpoint.source}' is a FaceID adapter ({spec.variant}), whose tokens do not depend on "
                         "the step; expected image_tokens (ipadapter.faceid.face_tokens) for it")
    if not images.has_clip_features:
        raise ValueError(f"the embeds hold face embeddings only (no image encoder saw the faces); "
                         f"'{checkpoint.source}' ({spec.variant}) takes {spec.encoder_name} {spec.encoder_input}: "
                         "expected embeds of images encoded by the image encoder")
    uses_embeds = spec.encoder_input == "image_embeds"
    cond = images.image_embeds if uses_embeds else images.penultimate
    uncond = images.uncond_image_embeds if uses_embeds else images.uncond_penultimate
    if uncond is None:
        # SD3.5 InstantX, like diffusers' SD3 pipeline, takes zero features for the unconditional half
        if uses_embeds or spec.projection == "time-resampler":
            uncond = torch.zeros_like(cond[:1])
        elif default_uncond_penultimate is not None:
            uncond = default_uncond_penultimate
        else:
            raise ValueError(f"'{checkpoint.source}' ({spec.variant}) needs the encoder's output for a blank image")
    check_encoder(spec, images.image_embeds.shape[-1], images.penultimate.shape[-1], checkpoint.source, images.encoder_name)
    parameter = next(projection.parameters())
    return cond.to(parameter), uncond.to(parameter)


def layer_keys_values(
    checkpoint: IPAdapterCheckpoint, tokens: torch.Tensor, device: torch.device, dtype: torch.dtype,
    heads: int | None = None, time_embedding: torch.Tensor | None = None,
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """K' and V' of every layer the adapter carries, for these image tokens [..., T, C]. A UNet's do not depend on
    the step; SD3.5 InstantX's take the timestep embedding its Resampler made (``time_embedding`` [..., E]).
    ``heads``: the model's head count, for the DiT adapters that normalise K' per head."""
    spec = checkpoint.spec
    tokens = tokens.to(device=device, dtype=torch.float32)
    result = {}
    if spec.architecture.attach.is_unet:
        for key in spec.layer_keys:
            to_k, to_v = checkpoint.layer_weights(key)
            k = tokens @ to_k.to(device=device, dtype=torch.float32).T
            v = tokens @ to_v.to(device=device, dtype=torch.float32).T
            result[key] = (k.to(dtype), v.to(dtype))
        return result
    lead = tokens.shape[:-2]
    flat = tokens.reshape(-1, *tokens.shape[-2:])
    if time_embedding is not None:
        time_embedding = time_embedding.to(device=device, dtype=torch.float32).reshape(-1, time_embedding.shape[-1])
    for key in spec.layer_keys:
        layer = {name: tensor.to(device) for name, tensor in checkpoint.layer_tensors(key).items()}
        k, v = dit_keys_values(spec.projection, layer, flat, heads, time_embedding)
        result[key] = (k.reshape(*lead, *k.shape[-2:]).to(dtype), v.reshape(*lead, *v.shape[-2:]).to(dtype))
    return result


def token_grid(latent_height: int, latent_width: int, tokens: int) -> tuple[int, int]:
    """Height and width of a UNet level's feature map that has ``tokens`` positions."""
    for level in range(5):
        height = math.ceil(latent_height / 2**level)
        width = math.ceil(latent_width / 2**level)
        if height * width == tokens:
            return height, width
    raise ValueError(f"no UNet level of a {latent_height}x{latent_width} latent has {tokens} positions")


def mask_to_tokens(mask: torch.Tensor, latent_height: int, latent_width: int, tokens: int) -> torch.Tensor:
    """Resize a region mask [M, H, W] to a layer's query tokens: [M, tokens]."""
    height, width = token_grid(latent_height, latent_width, tokens)
    resized = F.interpolate(mask[:, None].float(), size=(height, width), mode="bilinear", align_corners=False)
    return resized.reshape(mask.shape[0], height * width)


def check_mask(mask: torch.Tensor) -> torch.Tensor:
    """A MASK as [M, H, W]; refuse anything that is not 2-d or 3-d."""
    if mask.dim() == 2:
        mask = mask[None]
    if mask.dim() != 3 or mask.shape[-1] == 0 or mask.shape[-2] == 0:
        raise ValueError(f"attention mask has shape {list(mask.shape)}; expected [height, width] or [batch, height, width]")
    return mask
