"""One process, DDP (torchrun) or DeepSpeed ZeRO-2 (the deepspeed launcher), behind one small interface.

Both launchers set RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR; the deepspeed launcher
also passes ``--local_rank``. ``distributed.strategy: auto`` picks DeepSpeed under the
deepspeed launcher, DDP under torchrun, and a plain loop for one process.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as torch_dist

from .adapter import IPAdapterModel
from .config import Config, ConfigError

log = logging.getLogger("training")


@dataclass
class Process:
    strategy: str  # "single" | "ddp" | "deepspeed"
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            torch_dist.barrier()

    def mean(self, value: float) -> float:
        if self.world_size == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
        torch_dist.all_reduce(tensor)
        return tensor.item() / self.world_size

    def gather(self, obj: object) -> list:
        if self.world_size == 1:
            return [obj]
        gathered = [None] * self.world_size
        torch_dist.all_gather_object(gathered, obj)
        return gathered

    def broadcast(self, obj: object) -> object:
        if self.world_size == 1:
            return obj
        holder = [obj]
        torch_dist.broadcast_object_list(holder, src=0)
        return holder[0]


def setup(config: Config, flags: dict[str, str]) -> Process:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", flags.get("local_rank", "0")))
    strategy = config.distributed.strategy
    launched_by_deepspeed = "local_rank" in flags
    if strategy == "auto":
        strategy = "single" if world_size == 1 and not launched_by_deepspeed else ("deepspeed" if launched_by_deepspeed else "ddp")
    if strategy == "single" and world_size > 1:
        raise ConfigError(f"distributed.strategy is 'single' but {world_size} processes were launched; expected ddp or deepspeed")
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    backend = config.distributed.backend
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if strategy == "deepspeed":
        import deepspeed

        deepspeed.init_distributed(dist_backend=backend, timeout=datetime.timedelta(minutes=30))
    elif strategy == "ddp":
        torch_dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
    return Process(strategy, rank, world_size, local_rank, device)


def teardown(process: Process) -> None:
    if process.world_size > 1 and torch_dist.is_initialized():
        torch_dist.barrier()
        torch_dist.destroy_process_group()


def make_optimizer(model: IPAdapterModel, config: Config) -> torch.optim.Optimizer:
    optim = config.optim
    parameters = model.trainable_parameters()
    # fused AdamW (one kernel for all parameters) where it is available: CUDA
    fused = {"fused": True} if parameters[0].device.type == "cuda" else {}
    return torch.optim.AdamW(
        parameters, lr=optim.lr, weight_decay=optim.weight_decay,
        betas=(optim.beta1, optim.beta2), eps=optim.eps, **fused,
    )


class Engine:
    """Forward, backward + optimiser step, and optimiser state files, for one strategy."""

    def __init__(self, model: IPAdapterModel, config: Config, process: Process):
        self.module = model
        self.process = process
        self.optimizer = make_optimizer(model, config)
        self.wrapped = model
        self.deepspeed = None
        if process.strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [process.local_rank] if process.device.type == "cuda" else None
            self.wrapped = DistributedDataParallel(model, device_ids=device_ids)
        elif process.strategy == "deepspeed":
            import deepspeed

            self.deepspeed, self.optimizer, _, _ = deepspeed.initialize(
                model=model, optimizer=self.optimizer, config=deepspeed_config(config, process)
            )
            self.wrapped = self.deepspeed

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        return self.wrapped(*args, **kwargs)

    def step(self, loss: torch.Tensor) -> None:
        if self.deepspeed is not None:
            self.deepspeed.backward(loss)
            self.deepspeed.step()
            return
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def save_optimizer(self, folder: Path) -> None:
        """Called on every rank; ZeRO-2 writes one optimiser partition per rank."""
        if self.deepspeed is not None:
            self.deepspeed.save_checkpoint(str(folder), tag="deepspeed", save_latest=False, exclude_frozen_parameters=True)
        elif self.process.is_main:
            torch.save(self.optimizer.state_dict(), folder / "optimizer.pt")

    def load_optimizer(self, folder: Path) -> None:
        if self.deepspeed is not None:
            if not (folder / "deepspeed").is_dir():
                raise ConfigError(f"training state '{folder}' was not written by DeepSpeed; resume it with the strategy that wrote it")
            self.deepspeed.load_checkpoint(str(folder), tag="deepspeed", load_module_strict=False)
            return
        path = folder / "optimizer.pt"
        if not path.is_file():
            raise ConfigError(f"training state '{folder}' has no optimizer.pt (written by DeepSpeed?); resume it with the strategy that wrote it")
        self.optimizer.load_state_dict(torch.load(path, map_location=self.process.device, weights_only=True))


def deepspeed_config(config: Config, process: Process) -> dict:
    """ZeRO stage 2 over the trainable weights only, fp32 master weights and optimiser state.

    Mixed precision is ours (frozen models cast to bf16/fp16, adapter kept in fp32), so
    DeepSpeed's own fp16/bf16 modes stay off; the optimiser is torch's AdamW and gradient
    clipping is off, so the update is the same as in the single-process and DDP paths.
    """
    return {
        "train_micro_batch_size_per_gpu": config.train.batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": config.train.batch_size * process.world_size,
        "gradient_clipping": 0.0,  # DeepSpeed clips at norm 1.0 unless told; the recipe (and our other paths) never clip
        "zero_optimization": {
            "stage": config.distributed.zero_stage,
            "overlap_comm": process.device.type == "cuda",
            "contiguous_gradients": True,
        },
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def describe(process: Process) -> str:
    return json.dumps({"strategy": process.strategy, "world_size": process.world_size, "device": str(process.device)})


def check_same_weights(process: Process, model) -> None:
    """Every rank must end with the same adapter; a difference means a broken gradient sync."""
    digest = hashlib.sha1()
    for key, tensor in sorted(model.trainable_state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    digests = process.gather(digest.hexdigest())
    if len(set(digests)) > 1:
        raise RuntimeError(f"ranks ended with different adapter weights ({digests}); expected identical weights after each step")
    if process.world_size > 1:
        log.info("adapter weights identical on all %d ranks (sha1 %s)", process.world_size, digests[0][:12])
