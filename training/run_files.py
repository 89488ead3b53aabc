"""Training state for ``--resume`` and adapter export in the official layout.

A state is a folder ``state/step-00000100/``: ``adapter.pt`` (fp32 trainable weights),
the optimiser state (``optimizer.pt``, or DeepSpeed's per-rank ZeRO partitions),
``rank-N.pt`` (RNG and data position of each rank) and ``meta.json``. It is written
under a temporary name and renamed when complete, then ``state/latest`` is replaced
atomically, so a run killed while saving resumes from the previous good state.
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from ipadapter.adapter_file import IPAdapterCheckpoint, save_adapter
from ipadapter.files import write_text_atomic

from .adapter import IPAdapterModel
from .config import ConfigError
from .distributed import Engine, Process

log = logging.getLogger("training")
EXPORT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def state_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "state"


def save_state(output_dir: str | Path, step: int, engine: Engine, process: Process, data_position: dict, keep: int) -> Path:
    """Write the training state of ``step`` on every rank; returns the final folder."""
    root = state_root(output_dir)
    final = root / f"step-{step:08d}"
    temporary = root / f".tmp-step-{step:08d}"
    if process.is_main:
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
    process.barrier()
    engine.save_optimizer(temporary)
    if process.is_main:
        torch.save(engine.module.trainable_state_dict(), temporary / "adapter.pt")
    torch.save({"rng": rng_state(), "data": data_position}, temporary / f"rank-{process.rank}.pt")
    process.barrier()
    if process.is_main:
        meta = {"step": step, "world_size": process.world_size, "strategy": process.strategy}
        (temporary / "meta.json").write_text(json.dumps(meta))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(temporary, final)
        write_text_atomic(root / "latest", final.name)
        _prune(root, keep)
    process.barrier()
    return final


def find_state(output_dir: str | Path, resume: str) -> Path | None:
    """The state folder to resume: ``latest`` in the output folder, or a given state folder.

    A ``latest`` that points at a missing or incomplete folder falls back to the newest
    complete one; folders still under a temporary name are ignored.
    """
    if resume not in ("latest", "true", "True", "1"):
        folder = Path(resume)
        if not (folder / "meta.json").is_file():
            raise ConfigError(f"--resume '{resume}' is not a complete training state; expected a state/step-N folder with meta.json")
        return folder
    root = state_root(output_dir)
    pointer = root / "latest"
    if pointer.is_file():
        folder = root / pointer.read_text().strip()
        if (folder / "meta.json").is_file():
            return folder
    complete = sorted(p for p in root.glob("step-*") if (p / "meta.json").is_file())
    return complete[-1] if complete else None


def load_state(folder: Path, engine: Engine, process: Process) -> tuple[int, dict]:
    """Restore weights, optimiser and this rank's RNG; returns (step, this rank's data position)."""
    meta = json.loads((folder / "meta.json").read_text())
    if process.strategy == "deepspeed" and meta["world_size"] != process.world_size:
        raise ConfigError(
            f"training state '{folder}' holds ZeRO-2 partitions for {meta['world_size']} ranks; "
            f"expected {process.world_size} (resume with the same number of processes)"
        )
    tensors = torch.load(folder / "adapter.pt", map_location="cpu", weights_only=True)
    engine.module.load_trainable_state_dict(tensors)
    engine.load_optimizer(folder)
    rank_file = folder / f"rank-{process.rank}.pt"
    data_position: dict = {"step": meta["step"]}
    if rank_file.is_file():
        saved = torch.load(rank_file, map_location="cpu", weights_only=True)
        set_rng_state(saved["rng"])
        data_position = saved["data"]
        if meta["world_size"] != process.world_size:
            data_position = {"step": meta["step"], "skipped": data_position.get("skipped", {})}
    return meta["step"], data_position


def open_run(config, flags: dict, engine: Engine, process: Process) -> tuple[int, dict]:
    """(start step, this rank's data position): the state ``--resume`` names, else step 0; writes config.yaml."""
    if process.world_size > 1:
        zero = f" ZeRO-{config.distributed.zero_stage}" if process.strategy == "deepspeed" else ""
        log.info("distributed: %s%s, %d processes, global batch %d", process.strategy, zero, process.world_size,
                 process.world_size * config.train.batch_size)
    output_dir, start_step, position = Path(config.train.output_dir), 0, {}
    resume = flags.get("resume")
    if resume:
        state = find_state(output_dir, resume)
        if state is None:
            log.info("resume: no training state in %s yet; starting from step 0", state_root(output_dir))
        else:
            start_step, position = load_state(state, engine, process)
            log.info("resume: continuing from %s (step %d)", state, start_step)
    elif process.is_main and (state_root(output_dir) / "latest").is_file():
        log.warning("%s already holds a training state; pass --resume to continue it (starting from step 0)", output_dir)
    if process.is_main:
        config.save(output_dir / "config.yaml")
    return start_step, position


def save_hook(config, process: Process, engine: Engine, data_position):
    """A step hook that saves the training state every ``train.save_every`` steps."""
    def save(step: int) -> None:
        if config.train.save_every and step % config.train.save_every == 0:
            save_state(config.train.output_dir, step, engine, process, data_position.state(), config.train.keep_states)

    return save


def save_final_state(config, process: Process, engine: Engine, start_step: int, data_position) -> int:
    """The last step's state, unless the periodic save wrote it; returns the last step."""
    final_step = max(start_step, config.train.max_steps)
    if final_step > start_step and (not config.train.save_every or final_step % config.train.save_every):
        save_state(config.train.output_dir, final_step, engine, process, data_position.state(), config.train.keep_states)
    return final_step


def rng_state() -> dict:
    name, keys, position, has_gauss, cached = np.random.get_state()
    numpy_state = (name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached)
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def export_adapter(
    model: IPAdapterModel, path: str | Path, step: int, config_yaml: str, dtype: str = "fp16", variant: str | None = None
) -> Path:
    """The adapter in the official layout: ``.safetensors`` flat (with step, config and variant), else nested ``.bin``.

    Keys come from the model's own modules, numbered by the UNet's processor order, never
    from a framework's (possibly aliased) state dict. ``variant`` (default: the architecture's,
    ``base`` or ``plus``) names what was trained, e.g. ``plus-face``: the tensors cannot tell.
    """
    image_proj, ip_adapter = model.adapter_state_dicts()
    base_width = model.unet.config.block_out_channels[0]
    metadata = {"step": str(step), "config": config_yaml, "format": f"IP-Adapter {model.spec.family} (official layout)",
                "variant": variant or model.spec.variant}
    checkpoint = IPAdapterCheckpoint.from_state_dicts(image_proj, ip_adapter, Path(path).name, base_width, metadata,
                                                      model.spec.architecture)
    return save_adapter(checkpoint, path, dtype=EXPORT_DTYPES[dtype])


def _prune(root: Path, keep: int) -> None:
    states = sorted(p for p in root.glob("step-*") if (p / "meta.json").is_file())
    for old in states[: max(len(states) - max(keep, 1), 0)]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp-step-*"):
        shutil.rmtree(stale, ignore_errors=True)
