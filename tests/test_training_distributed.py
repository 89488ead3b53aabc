"""Two processes on CPU (gloo): DeepSpeed ZeRO-2 through its launcher, DDP through torchrun.

Each compares with one process holding the same global batch and seed. The match is
close, not bitwise: the two ranks' mean gradients are averaged by an all-reduce,
which sums in a different order than the one-process mean over the whole batch, so
gradients differ at float32 rounding level. The samples, noise, timesteps and drops
are the same: they are drawn per global sample position, not per rank.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from training.data import write_toy_dataset
from training_fixtures import adapter, assert_close_weights, free_port, launch, two_deepspeed_processes
from training.run import main

pytestmark = pytest.mark.slow


def common_args(output_dir: Path, data: Path, steps: int, batch_size: int) -> list[str]:
    return [
        "--train.output_dir", str(output_dir), "--data.path", str(data), "--train.max_steps", str(steps),
        "--train.batch_size", str(batch_size), "--data.resolution", "64", "--train.save_every", "2",
        "--train.log_every", "2", "--sample.every", "0", "--train.progress", "false", "--data.num_workers", "0",
    ]


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory) -> Path:
    return write_toy_dataset(tmp_path_factory.mktemp("toy"), count=16, seed=1)


@pytest.fixture(scope="module")
def single_process(tmp_path_factory, toy_data) -> Path:
    output_dir = tmp_path_factory.mktemp("single")
    main(common_args(output_dir, toy_data, 6, 4))
    return output_dir


def test_deepspeed_zero2_two_processes_train_save_resume_and_match_one_process(tmp_path, toy_data, single_process):
    deepspeed = two_deepspeed_processes()
    first = launch(deepspeed + common_args(tmp_path, toy_data, 4, 2))
    assert "distributed: deepspeed ZeRO-2, 2 processes, global batch 4" in first
    assert "adapter weights identical on all 2 ranks" in first
    state = tmp_path / "state" / "step-00000004"
    assert sorted(p.name for p in (state / "deepspeed").glob("zero_pp_rank_*")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    resumed = launch(deepspeed + common_args(tmp_path, toy_data, 6, 2) + ["--resume"])
    assert "resume: continuing from" in resumed and "(step 4)" in resumed
    assert "adapter weights identical on all 2 ranks" in resumed
    assert_close_weights(adapter(tmp_path, 6), adapter(single_process, 6))
    assert (tmp_path / "ip-adapter_sd15_step00000006.safetensors").is_file()


def test_torchrun_ddp_two_processes_match_one_process(tmp_path, toy_data, single_process):
    torchrun = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "training.run"]
    output = launch(torchrun + common_args(tmp_path, toy_data, 6, 2))
    assert "distributed: ddp, 2 processes, global batch 4" in output
    assert "adapter weights identical on all 2 ranks" in output
    assert_close_weights(adapter(tmp_path, 6), adapter(single_process, 6))


def test_deepspeed_zero2_plus_matches_one_process(tmp_path, toy_data):
    plus = ["--model.variant", "plus"]
    main(common_args(tmp_path / "single", toy_data, 2, 4) + plus)
    deepspeed = two_deepspeed_processes()
    output = launch(deepspeed + common_args(tmp_path / "two", toy_data, 2, 2) + plus)
    assert "distributed: deepspeed ZeRO-2, 2 processes, global batch 4" in output
    assert "adapter weights identical on all 2 ranks" in output
    assert_close_weights(adapter(tmp_path / "two", 2), adapter(tmp_path / "single", 2))
    assert (tmp_path / "two" / "ip-adapter-plus_sd15_step00000002.safetensors").is_file()
