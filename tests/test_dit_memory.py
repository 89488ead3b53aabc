"""The arithmetic of bench/dit_memory.py (issue 22's memory table), on made-up measurements: no model is built."""
import pytest

from bench.dit_memory import GIB, activation_bytes, adapter_bytes, deepspeed_bytes, held_per_block, scaled

MIB = 2**20


def test_zero2_shards_gradients_and_adam_states_but_not_the_fp32_weights():
    trainable = 1_000_000
    assert adapter_bytes(trainable, 1) == 16 * trainable
    assert adapter_bytes(trainable, 8) == (4 + 12 / 8) * trainable
    assert deepspeed_bytes(trainable, 1) == 0  # one process trains without DeepSpeed
    assert deepspeed_bytes(trainable, 8) == 4 * trainable / 8 + 2 * 500_000_000 * 4


def test_tensors_scale_with_their_own_tokens_and_the_batch():
    # Flux at 512 px: 1024 image + 512 text tokens; at 1024 px: 4096 + 512
    assert scaled(MIB, "image", "flux", 512, 1024, 1) == 4 * MIB
    assert scaled(MIB, "text", "flux", 512, 1024, 4) == 4 * MIB
    assert scaled(MIB, "joint", "flux", 512, 1024, 1) == pytest.approx(3 * MIB)
    assert scaled(MIB, "none", "flux", 512, 1024, 4) == MIB  # the adapter's weights cast to bf16


def step(outside, double, single, double_out, single_out, backward=0):
    return {"side": 512, "backward": backward,
            "held": {"outside": {"none": outside}, "double": {"image": double}, "single": {"joint": single}},
            "outputs": {"double": {"image": double_out}, "single": {"joint": single_out}}}


def test_checkpointing_keeps_each_blocks_outputs_but_the_last_ones():
    measured = step(outside=1 * MIB, double=200 * MIB, single=100 * MIB, double_out=9 * MIB, single_out=9 * MIB)
    assert held_per_block(measured, "flux", checkpointing=False) == [
        (1, {"none": MIB}), (19, {"image": 200 * MIB}), (38, {"joint": 100 * MIB})]
    # the last single block's outputs go to the final layer, already in "outside"
    assert held_per_block(measured, "flux", checkpointing=True) == [
        (1, {"none": MIB}), (19, {"image": 9 * MIB}), (37, {"joint": 9 * MIB})]
    assert activation_bytes(measured, "flux", 512, 1, checkpointing=True) == (1 + 19 * 9 + 37 * 9) * MIB


def test_the_backward_working_set_is_added_once_and_scaled_as_image_tokens():
    measured = step(outside=0, double=0, single=0, double_out=0, single_out=0, backward=GIB)
    assert activation_bytes(measured, "flux", 1024, 4, checkpointing=False) == 16 * GIB
