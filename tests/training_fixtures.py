"""Helpers for the training tests: reference-shaped modules, small data sources with bad rows.

The reference modules restate the IP-Adapter authors' public training code
(``ImageProjModel``, ``IPAttnProcessor2_0``, ``adapter_modules = ModuleList(unet.attn_processors.values())``)
so a strict ``load_state_dict`` of our export into them checks names, shapes and numbering.
"""
from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import torch

import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0
from PIL import Image
from torch import nn


class ReferenceImageProjModel(nn.Module):
    def __init__(self, cross_attention_dim=768, clip_embeddings_dim=1024, clip_extra_context_tokens=4):
        super().__init__()
        self.cross_attention_dim = cross_attention_dim
        self.clip_extra_context_tokens = clip_extra_context_tokens
        self.proj = nn.Linear(clip_embeddings_dim, clip_extra_context_tokens * cross_attention_dim)
        self.norm = nn.LayerNorm(cross_attention_dim)

    def forward(self, image_embeds):
        tokens = self.proj(image_embeds).reshape(-1, self.clip_extra_context_tokens, self.cross_attention_dim)
        return self.norm(tokens)


class ReferenceAttnProcessor(nn.Module):
    """Self-attention processor with no weights (an ``nn.Module`` so it can sit in the ModuleList)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        return AttnProcessor2_0()(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


class ReferenceIPAttnProcessor(nn.Module):
    """The reference's decoupled cross-attention: image tokens are the last ``num_tokens`` of the context."""

    def __init__(self, hidden_size, cross_attention_dim=None, scale=1.0, num_tokens=4):
        super().__init__()
        self.scale = scale
        self.num_tokens = num_tokens
        self.to_k_ip = nn.Linear(cross_attention_dim or hidden_size, hidden_size, bias=False)
        self.to_v_ip = nn.Linear(cross_attention_dim or hidden_size, hidden_size, bias=False)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        residual = hidden_states
        batch_size = hidden_states.shape[0]
        query = attn.to_q(hidden_states)
        end_pos = encoder_hidden_states.shape[1] - self.num_tokens
        encoder_hidden_states, ip_hidden_states = encoder_hidden_states[:, :end_pos], encoder_hidden_states[:, end_pos:]
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads

        def heads(x):
            return x.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(query), heads(key), heads(value))
        out = out.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        ip_out = F.scaled_dot_product_attention(heads(query), heads(self.to_k_ip(ip_hidden_states)), heads(self.to_v_ip(ip_hidden_states)))
        ip_out = ip_out.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        out = attn.to_out[1](attn.to_out[0](out + self.scale * ip_out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def reference_adapter_modules(unet, num_tokens=4) -> nn.ModuleList:
    """Install reference processors in ``unet`` the way the reference trainer does; returns ``adapter_modules``."""
    processors = {}
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            processors[name] = ReferenceAttnProcessor()
            continue
        if name.startswith("mid_block"):
            hidden_size = unet.config.block_out_channels[-1]
        elif name.startswith("up_blocks"):
            hidden_size = list(reversed(unet.config.block_out_channels))[int(name[len("up_blocks.")])]
        else:
            hidden_size = unet.config.block_out_channels[int(name[len("down_blocks.")])]
        processors[name] = ReferenceIPAttnProcessor(hidden_size, unet.config.cross_attention_dim, num_tokens=num_tokens)
    unet.set_attn_processor(processors)
    return nn.ModuleList(unet.attn_processors.values())


# --- data ------------------------------------------------------------------------------


def png_bytes(color=(200, 30, 30), size=(40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def write_image(path: Path, color=(200, 30, 30), size=(40, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(color, size))
    return path


BROKEN_IMAGE = b"\x89PNG\r\n\x1a\n this is not really a png"


def write_manifest_with_bad_rows(folder: Path, good: int = 6, suffix: str = ".jsonl") -> Path:
    """``good`` usable rows plus: a missing file, an empty caption, a broken image, (JSONL) a garbled line."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for index in range(good):
        write_image(folder / "images" / f"{index}.png", color=(20 * index, 100, 200 - 20 * index))
        rows.append({"image": f"images/{index}.png", "text": f"picture number {index}"})
    (folder / "images" / "broken.png").write_bytes(BROKEN_IMAGE)
    rows.append({"image": "images/broken.png", "text": "a broken image"})
    rows.append({"image": "images/missing.png", "text": "a missing file"})
    write_image(folder / "images" / "nocaption.png")
    rows.append({"image": "images/nocaption.png", "text": "   "})
    path = folder / f"manifest{suffix}"
    if suffix == ".csv":
        lines = ["image,text"] + [f'{r["image"]},"{r["text"]}"' for r in rows]
        path.write_text("\n".join(lines) + "\n")
    else:
        lines = [json.dumps(r) for r in rows]
        lines.insert(2, "{not json")
        path.write_text("\n".join(lines) + "\n")
    return path


def write_folder_with_bad_rows(folder: Path, good: int = 6) -> Path:
    """``good`` pairs plus: an image without .txt, an empty .txt, a broken image with a caption."""
    for index in range(good):
        write_image(folder / f"{index}.png", color=(30 * index, 60, 90))
        (folder / f"{index}.txt").write_text(f"caption {index}")
    write_image(folder / "uncaptioned.png")
    write_image(folder / "emptycaption.png")
    (folder / "emptycaption.txt").write_text("\n")
    (folder / "zz_broken.png").write_bytes(BROKEN_IMAGE)
    (folder / "zz_broken.txt").write_text("broken")
    return folder


def write_shards(folder: Path, shards: int = 4, per_shard: int = 5, bad: bool = True) -> list[Path]:
    """img2dataset-style shards; with ``bad``, each shard also holds a broken image, an empty caption and an image-less sample."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard in range(shards):
        path = folder / f"{shard:05d}.tar"
        with tarfile.open(path, "w") as archive:
            members = []
            for index in range(per_shard):
                key = f"{shard:05d}{index:04d}"
                members += [(f"{key}.jpg", png_bytes((10 * index, 50 * shard % 255, 90))), (f"{key}.txt", f"shard {shard} sample {index}".encode()),
                            (f"{key}.json", json.dumps({"key": key}).encode())]
            if bad:
                members += [(f"{shard:05d}9001.jpg", BROKEN_IMAGE), (f"{shard:05d}9001.txt", b"broken")]
                members += [(f"{shard:05d}9002.jpg", png_bytes()), (f"{shard:05d}9002.txt", b"")]
                members += [(f"{shard:05d}9003.txt", b"caption without an image")]
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
        paths.append(path)
    return paths


def write_model_files(root: Path, seed: int = 5, family: str = "sd15"):
    """A scaled-down SD1.5 (or SDXL) as a diffusers folder (``root/sd15``, ``root/sdxl``) and an OpenCLIP-format
    image encoder file (ViT-H's layout, narrow).

    Returns the folder, the encoder file and the in-memory models they were written from.
    """
    from safetensors.torch import save_file

    from ipadapter.registry import family_by_id
    from training.models import build_embedded_models

    frozen = build_embedded_models(family_by_id(family), seed=seed)
    for name, module in {**frozen.modules(), "scheduler": frozen.scheduler}.items():
        if module is not None and name != "image_encoder":  # the encoder is written below, as an OpenCLIP file
            module.save_pretrained(str(root / family / name))
    encoder = root / "open_clip_small.safetensors"
    save_file({f"visual.{k}": v.contiguous() for k, v in frozen.image_encoder.visual.state_dict().items()}, str(encoder))
    return root / family, encoder, frozen


def write_fake_single_file(path: Path, family) -> Path:
    """A single file with one tensor under each of the family's single-file prefixes: enough to be detected."""
    import torch
    from safetensors.torch import save_file

    facts = family.training
    prefixes = [facts.unet_prefix, facts.vae_prefix, *(encoder.single_file_prefix for encoder in facts.text_encoders)]
    save_file({f"{prefix}weight": torch.zeros(2) for prefix in prefixes}, str(path))
    return path


# --- runs in other processes (launchers, kill -9) ---------------------------------------------

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as handle:
        handle.bind(("127.0.0.1", 0))
        return handle.getsockname()[1]


def launch(command: list[str]) -> str:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    return output


def adapter(output_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return torch.load(output_dir / "state" / f"step-{step:08d}" / "adapter.pt", weights_only=True)


def assert_close_weights(a: dict, b: dict, lr: float = 1e-4) -> None:
    """Rounding-level gradient differences, as Adam sees them: a few elements with near-zero
    gradients move by a visible fraction of one step (m / sqrt(v) amplifies them), the rest agree."""
    assert a.keys() == b.keys()
    difference = torch.cat([(a[key] - b[key]).flatten() for key in a]).abs()
    print(f"difference to one process: max {difference.max().item():.2e}, mean {difference.mean().item():.2e}")
    assert difference.max().item() <= 0.1 * lr
    assert difference.mean().item() <= 1e-8


def two_deepspeed_processes() -> list[str]:
    """``deepspeed`` launching ``python -m training.run`` in two processes (ZeRO-2 on CPU over gloo with ``launch``)."""
    return [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), "--module", "training.run"]
