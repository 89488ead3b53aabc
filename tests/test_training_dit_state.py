"""The DiT trainer beyond one straight run (tiny random Flux.1, XLabs, CPU): a kill -9 then --resume exports the
uninterrupted run's tensors bit for bit; two ZeRO-2 processes train what one process trains; recomputing the
frozen blocks in the backward pass changes the memory, not the gradients; a resolution the VAE and the patches
cannot take is one line."""
from __future__ import annotations

import signal
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from dit_training_fixtures import files  # noqa: F401 (a fixture)
from ipadapter.registry import family_by_id
from training.errors import ModelFileError
from training.run import main
from training_fixtures import REPO, adapter, assert_close_weights, launch, two_deepspeed_processes

EXPORT = "ip_adapter_flux_step00000006.safetensors"


def xlabs_args(files, output, steps: int = 6, batch: int = 2, *extra) -> list[str]:
    return ["--model.base", str(files["flux"]), "--model.image_encoder", str(files["clip"]), "--model.encoder_embed_dim",
            "32", "--model.variant", "xlabs", "--model.num_tokens", "4", "--data.path", str(files["data"]),
            "--train.output_dir", str(output), "--data.resolution", "32", "--data.num_workers", "0",
            "--train.batch_size", str(batch), "--train.max_steps", str(steps), "--train.save_every", "2",
            "--train.log_every", "2", "--train.progress", "false", "--sample.every", "0", "--train.export_dtype", "fp32",
            "--train.export_formats", "safetensors", *extra]


def tensors_and_step(path):
    with safe_open(str(path), "pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}, handle.metadata()["step"]


KILLED_AT_STEP_5 = ("import os, signal, sys\nfrom training.run import main\n"
                    "main(sys.argv[1:], extra_hooks=[lambda step: step == 5 and os.kill(os.getpid(), signal.SIGKILL)])")


def test_a_kill_9_and_resume_export_the_uninterrupted_runs_tensors_bit_for_bit(files, tmp_path):
    main(xlabs_args(files, tmp_path / "straight"))
    killed = tmp_path / "killed"
    run = subprocess.run([sys.executable, "-c", KILLED_AT_STEP_5, *xlabs_args(files, killed)], cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == -signal.SIGKILL, run.stderr[-2000:]
    assert (killed / "state" / "latest").read_text() == "step-00000004" and not list(killed.glob("*.safetensors"))
    resumed = main(xlabs_args(files, killed, 6, 2, "--resume"))
    assert resumed["step"] == 6
    ours, step = tensors_and_step(killed / EXPORT)
    expected, _ = tensors_and_step(tmp_path / "straight" / EXPORT)
    assert step == "6" and ours.keys() == expected.keys()
    assert all(torch.equal(ours[key], expected[key]) for key in expected)
    one_more = main(xlabs_args(files, tmp_path / "straight", 7, 2, "--resume"))  # the resumed optimiser moves on
    assert one_more["step"] == 7 and not torch.equal(
        tensors_and_step(tmp_path / "straight" / "ip_adapter_flux_step00000007.safetensors")[0]["ip_adapter_proj_model.proj.weight"],
        expected["ip_adapter_proj_model.proj.weight"])


@pytest.mark.slow
def test_two_zero2_processes_train_what_one_process_trains(files, tmp_path):
    main(xlabs_args(files, tmp_path / "one", 2, 4))
    output = launch(two_deepspeed_processes() + xlabs_args(files, tmp_path / "two", 2, 2))
    assert "distributed: deepspeed ZeRO-2, 2 processes, global batch 4" in output
    assert "adapter weights identical on all 2 ranks" in output
    two, one = adapter(tmp_path / "two", 2), adapter(tmp_path / "one", 2)
    # A key bias shifts every logit of a query equally, so softmax gives it a zero gradient: what it gets is rounding
    # noise, which Adam turns into steps (at most lr = 1e-4 each) of either sign. The other weights are compared.
    assert all((two[key] - one[key]).abs().max() <= 2 * 2e-4 for key in one if key.endswith("to_k_ip.bias"))
    assert_close_weights(*({k: v for k, v in state.items() if not k.endswith("to_k_ip.bias")} for state in (two, one)))


def saved_bytes_and_grads(model, parts, inputs):
    """Bytes autograd keeps for the backward pass, and the adapter's gradients, for one loss."""
    saved = []

    def pack(tensor):
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    model.zero_grad()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(parts, *inputs).square().mean()
    loss.backward()
    return sum(saved), {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


def test_recomputed_blocks_keep_less_for_backward_and_give_the_same_gradients(files):
    from training.dit_adapter import DiTAdapterModel
    from training.dit_models import load_dit_parts

    parts = load_dit_parts(files["flux"], family_by_id("flux"), torch.float32)
    model = DiTAdapterModel(parts.transformer, parts.family, "xlabs", 4, 32).train()
    torch.manual_seed(0)
    context, pooled = parts.encode_text(["a red square", "a blue circle"])
    inputs = (torch.randn(2, 16, 16, 16), torch.tensor([0.3, 0.8]), context, pooled, torch.randn(2, 32))
    kept, expected = saved_bytes_and_grads(model, parts, inputs)
    parts.transformer.enable_gradient_checkpointing()
    kept_recomputing, grads = saved_bytes_and_grads(model, parts, inputs)
    assert kept_recomputing < 0.5 * kept, (kept_recomputing, kept)
    assert all(torch.allclose(grads[name], expected[name], rtol=1e-5, atol=1e-7) for name in expected)
    assert any(grads[name].abs().max() > 0 for name in grads if "to_k_ip" in name)


def test_a_resolution_the_vae_and_patches_cannot_take_is_one_line(files, tmp_path):
    with pytest.raises(ModelFileError) as error:
        main(xlabs_args(files, tmp_path, 1, 2, "--data.resolution", "40"))
    assert str(error.value).count("\n") == 0
    assert str(error.value).startswith("data.resolution = 40; expected a multiple of 16 (Flux.1: the VAE")


def test_an_image_encoder_of_another_width_is_one_line(files, tmp_path):
    with pytest.raises(ModelFileError) as error:
        main(xlabs_args(files, tmp_path, 1, 2, "--model.image_encoder", str(files["siglip"])))
    assert str(error.value) == ("image encoder 'siglip.safetensors' (SigLIP ViT (width 144, 3 layers, patch 14)) gives "
                                "144-d image embeddings; expected 32 "
                                "(OpenAI CLIP ViT-L/14, the encoder of Flux.1 xlabs)")
