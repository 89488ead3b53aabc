"""The scoring CLIP model for evaluation, from the user's file, and the CLIP-I / CLIP-T math.

- CLIP-I: cosine between the CLIP image embeddings of a generated image and of its reference image.
- CLIP-T: cosine between the CLIP embeddings of a generated image and of the reference's caption.
- CLIPScore scaling (Hessel et al., 2021): ``2.5 * max(cosine, 0)``, per image, then averaged.

The model comes from a file, never a download: a full OpenCLIP checkpoint (image and text
towers) with its architecture named by ``arch`` (an OpenCLIP config name such as
``ViT-L-14`` / ``ViT-L-14-quickgelu`` / ``ViT-H-14``, or the path of an OpenCLIP model
config JSON), or a transformers ``CLIPModel`` (a folder with ``config.json``, or its
weights file next to that ``config.json``). Captions are tokenized with the CLIP BPE
vocabulary bundled with open_clip.
"""
from __future__ import annotations

import json
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from PIL import Image

from ipadapter.files import first_line, read_weights
from ipadapter.preprocess import CLIP_MEAN, CLIP_STD, preprocess

from .errors import UserError

CLIPSCORE_WEIGHT = 2.5
CLIP_VOCAB_SIZE = 49408  # the BPE vocabulary bundled with open_clip (OpenAI CLIP's)


class ClipFileError(UserError):
    """A scoring CLIP file that cannot be used; the message is one line."""


# --- the math -----------------------------------------------------------------------


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity of [..., D] embeddings (they need not be normalised)."""
    return (F.normalize(a.double(), dim=-1) * F.normalize(b.double(), dim=-1)).sum(-1)


def clipscore(cosines: torch.Tensor) -> torch.Tensor:
    """CLIPScore scaling of cosines: ``2.5 * max(cos, 0)``."""
    return CLIPSCORE_WEIGHT * cosines.clamp(min=0)


def score_samples(generated: torch.Tensor, reference: torch.Tensor, caption: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-sample raw cosines for R references with K samples each.

    ``generated`` [R, K, D], ``reference`` [R, D] and ``caption`` [R, D] embeddings ->
    ``clip_i`` and ``clip_t``, each [R, K].
    """
    if generated.dim() != 3 or reference.shape != caption.shape or generated.shape[0] != reference.shape[0]:
        raise ValueError(f"embeddings of shapes {list(generated.shape)}, {list(reference.shape)}, {list(caption.shape)}; "
                         "expected [R, K, D], [R, D], [R, D]")
    return {"clip_i": cosine(generated, reference[:, None]), "clip_t": cosine(generated, caption[:, None])}


def summarize(scores: dict[str, torch.Tensor]) -> dict:
    """Means over all samples of the raw cosines and of their CLIPScore scaling, with counts."""
    summary: dict = {"n_references": int(scores["clip_i"].shape[0]), "n_samples": int(scores["clip_i"].numel())}
    for name, values in scores.items():
        summary[name] = {"cosine": float(values.mean()), "clipscore": float(clipscore(values).mean()),
                         "cosine_std": float(values.std()) if values.numel() > 1 else 0.0}
    return summary


# --- the model ------------------------------------------------------------------------


class ScoringClip:
    """A CLIP model with both towers: images (0..1 floats) and captions -> embeddings."""

    def __init__(self, model: torch.nn.Module, kind: str, name: str, image_size: int, context_length: int,
                 mean=CLIP_MEAN, std=CLIP_STD):
        self.model = model.eval().requires_grad_(False)
        self.kind, self.name = kind, name  # kind: "open_clip" | "transformers"
        self.image_size, self.context_length = image_size, context_length
        self.mean, self.std = tuple(mean), tuple(std)
        self.tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=context_length)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: torch.device | str) -> "ScoringClip":
        self.model.to(device)
        return self

    def pixels(self, image: Image.Image) -> torch.Tensor:
        """CLIP's preprocessing: shortest side to the model's size (bicubic), center crop, its mean/std."""
        array = torch.frombuffer(bytearray(image.convert("RGB").tobytes()), dtype=torch.uint8)
        tensor = array.view(image.height, image.width, 3).float()[None] / 255
        pixels = preprocess(tensor, self.image_size, "crop")[0]
        if (self.mean, self.std) != (CLIP_MEAN, CLIP_STD):
            pixels = pixels * torch.tensor(CLIP_STD).view(3, 1, 1) + torch.tensor(CLIP_MEAN).view(3, 1, 1)
            pixels = (pixels - torch.tensor(self.mean).view(3, 1, 1)) / torch.tensor(self.std).view(3, 1, 1)
        return pixels

    @torch.no_grad()
    def encode_images(self, images: list[Image.Image]) -> torch.Tensor:
        pixels = torch.stack([self.pixels(image) for image in images]).to(self.device)
        if self.kind == "open_clip":
            return self.model.encode_image(pixels).float().cpu()
        return _features(self.model.get_image_features(pixel_values=pixels)).float().cpu()

    @torch.no_grad()
    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(list(texts), context_length=self.context_length).to(self.device)
        if self.kind == "open_clip":
            return self.model.encode_text(tokens).float().cpu()
        return _features(self.model.get_text_features(input_ids=tokens)).float().cpu()


def _features(output) -> torch.Tensor:
    """transformers 4 returns the projected features, transformers 5 an output with them as ``pooler_output``."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def load_scoring_clip(path: str | Path, arch: str = "ViT-L-14") -> ScoringClip:
    path = Path(path).expanduser()
    if path.is_dir():
        return _load_transformers(path, path / "config.json", _folder_weights(path))
    if not path.is_file():
        raise ClipFileError(f"scoring CLIP '{path}' does not exist; expected a full OpenCLIP checkpoint "
                            "(.safetensors/.bin/.pt) or a transformers CLIPModel folder")
    if _is_torchscript(path):
        raise ClipFileError(f"scoring CLIP '{path.name}' is a TorchScript archive (as OpenAI's original CLIP files); "
                            "expected plain weights: an OpenCLIP state dict or a transformers CLIPModel folder")
    state_dict, _ = read_weights(path, "scoring CLIP", ClipFileError)
    if isinstance(state_dict.get("state_dict"), dict):
        state_dict = state_dict["state_dict"]
    if state_dict and all(k.startswith("module.") for k in state_dict):  # OpenCLIP's DDP training checkpoints
        state_dict = {k[len("module."):]: v for k, v in state_dict.items()}
    keys = list(state_dict)
    if any(k.startswith(("text_model.", "vision_model.")) for k in keys):
        if not any(k.startswith("text_model.") for k in keys):
            raise ClipFileError(f"scoring CLIP '{path.name}' is an image-only CLIP (a transformers vision model, no text "
                                "tower; CLIP-T needs one); expected a full CLIP checkpoint with image and text towers")
        return _load_transformers(path, path.parent / "config.json", [path], state_dict)
    has_text, has_visual = "token_embedding.weight" in state_dict, any(k.startswith("visual.") for k in keys)
    if not (has_text and has_visual):
        what = ("an image-only CLIP (no text tower; CLIP-T needs one)" if has_visual or "conv1.weight" in state_dict
                else f"not a CLIP model (found keys like {', '.join(keys[:3]) or 'nothing'})")
        raise ClipFileError(f"scoring CLIP '{path.name}' is {what}; expected a full CLIP checkpoint with image and text towers")
    return _load_open_clip(path, arch, state_dict)


def _is_torchscript(path: Path) -> bool:
    import zipfile

    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("constants.pkl") or "/code/" in name for name in archive.namelist())


def _open_clip_config(arch: str) -> tuple[str, dict]:
    if arch.endswith(".json"):
        config_path = Path(arch).expanduser()
        if not config_path.is_file():
            raise ClipFileError(f"OpenCLIP model config '{config_path}' does not exist; expected a JSON model config")
        open_clip.add_model_config(config_path)
        arch = config_path.stem
    if ":" in arch:
        raise ClipFileError(f"--clip-model '{arch}' names a hub or folder schema; expected an OpenCLIP config name "
                            "(e.g. ViT-L-14) or a model config .json, weights come from --clip")
    config = open_clip.get_model_config(arch)
    if config is None:
        raise ClipFileError(f"OpenCLIP has no model config '{arch}'; expected a name like ViT-L-14, ViT-L-14-quickgelu, "
                            "ViT-H-14 or a model config .json")
    text_cfg = config.get("text_cfg", {})
    if text_cfg.get("hf_model_name") or text_cfg.get("hf_tokenizer_name") or text_cfg.get("vocab_size", CLIP_VOCAB_SIZE) != CLIP_VOCAB_SIZE:
        raise ClipFileError(f"OpenCLIP model '{arch}' uses its own tokenizer or a Hugging Face text tower; "
                            "expected a CLIP model with the CLIP BPE vocabulary (e.g. ViT-L-14, ViT-H-14)")
    return arch, config


def _load_open_clip(path: Path, arch: str, state_dict: dict) -> ScoringClip:
    arch, _ = _open_clip_config(arch)
    import logging

    previous = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # "No pretrained weights loaded": we load them next
    try:
        model = open_clip.create_model(arch, pretrained=None, pretrained_text=False, device="cpu")
    finally:
        logging.getLogger().setLevel(previous)
    expected = model.state_dict()
    state_dict = {k: v for k, v in state_dict.items() if not k.endswith("position_ids")}
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong = [f"'{k}' is {list(v.shape)}, expected {list(expected[k].shape)}" for k, v in state_dict.items()
             if k in expected and (not isinstance(v, torch.Tensor) or v.shape != expected[k].shape)]
    if missing or unexpected or wrong:
        detail = f"missing {missing[:2]}" if missing else f"unexpected {unexpected[:2]}" if unexpected else wrong[0]
        raise ClipFileError(f"scoring CLIP '{path.name}' does not match OpenCLIP '{arch}' ({detail}); "
                            "pass --clip-model with the checkpoint's architecture")
    model.load_state_dict(state_dict, strict=True)
    cfg = model.visual.preprocess_cfg if hasattr(model.visual, "preprocess_cfg") else {}
    size = model.visual.image_size
    return ScoringClip(model.float(), "open_clip", f"OpenCLIP {arch}", size[0] if isinstance(size, (tuple, list)) else size,
                       model.context_length, cfg.get("mean", CLIP_MEAN), cfg.get("std", CLIP_STD))


def _folder_weights(folder: Path) -> list[Path]:
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return [folder / name]
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        raise ClipFileError(f"scoring CLIP folder '{folder}' has no model.safetensors or pytorch_model.bin; "
                            "expected a transformers CLIPModel folder")
    return shards


def _load_transformers(path: Path, config_path: Path, files: list[Path], state_dict: dict | None = None) -> ScoringClip:
    from transformers import CLIPConfig, CLIPModel

    if not config_path.is_file():
        raise ClipFileError(f"scoring CLIP '{path.name}' has transformers keys but no config.json beside it; "
                            "expected a transformers CLIPModel folder (save_pretrained) or an OpenCLIP checkpoint")
    try:
        raw = json.loads(config_path.read_text())
    except (OSError, ValueError) as error:
        raise ClipFileError(f"'{config_path}' is not readable JSON ({first_line(error)})") from None
    if raw.get("model_type") != "clip" or "text_config" not in raw:
        raise ClipFileError(f"scoring CLIP '{path.name}' is a transformers '{raw.get('model_type')}' model; "
                            "expected a CLIPModel with image and text towers (model_type 'clip')")
    config = CLIPConfig.from_dict(raw)
    if config.text_config.vocab_size != CLIP_VOCAB_SIZE:
        raise ClipFileError(f"scoring CLIP '{path.name}' has a {config.text_config.vocab_size}-token vocabulary; "
                            f"expected CLIP's {CLIP_VOCAB_SIZE}")
    if state_dict is None:
        state_dict = {}
        for file in files:
            state_dict.update(read_weights(file, "scoring CLIP", ClipFileError)[0])
    model = CLIPModel(config)
    expected = model.state_dict()
    tensors = {k: v for k, v in state_dict.items() if k in expected and not k.endswith("position_ids")}
    missing = [k for k in expected if k not in tensors and not k.endswith("position_ids")]
    wrong = [k for k, v in tensors.items() if not isinstance(v, torch.Tensor) or v.shape != expected[k].shape]
    if missing or wrong:
        detail = f"missing {missing[:2]}" if missing else f"'{wrong[0]}' has the wrong shape"
        raise ClipFileError(f"scoring CLIP '{path.name}' does not match its config.json ({detail}); expected complete CLIPModel weights")
    model.load_state_dict(tensors, strict=False)  # strict apart from the position_ids buffers
    processor = config_path.parent / "preprocessor_config.json"
    mean, std = CLIP_MEAN, CLIP_STD
    if processor.is_file():
        try:
            values = json.loads(processor.read_text())
            mean, std = values.get("image_mean", mean), values.get("image_std", std)
        except ValueError:
            pass
    return ScoringClip(model.float(), "transformers", f"transformers CLIPModel ({path.name})",
                       config.vision_config.image_size, config.text_config.max_position_embeddings, mean, std)
