"""The experiment's base-model training keeps EMA weights (fast: a few steps of a 32-wide UNet)."""
import random

import torch

from experiments.colour_shapes import base, data


def test_base_training_saves_the_moving_average_not_the_last_weights():
    images, captions = data.batch(random.Random(0), 8)[:2]
    vae, text_encoder = base.build_vae(1).eval().requires_grad_(False), base.build_text_encoder(2)
    trained = {}
    for decay in (0.0, 0.999):
        unet = base.build_unet(32, seed=5)
        report = base.train_base(unet, vae, text_encoder, images, captions, steps=3, batch_size=2, seed=6, ema_decay=decay)
        assert report["ema_decay"] == decay
        trained[decay] = torch.cat([p.flatten() for p in unet.parameters()])
    start = torch.cat([p.flatten() for p in base.build_unet(32, seed=5).parameters()])
    assert torch.isfinite(trained[0.999]).all()
    assert not torch.equal(trained[0.0], start)  # the raw run moved the weights
    # the average lags the last weights: different, and closer to where training started
    assert not torch.equal(trained[0.999], trained[0.0])
    assert (trained[0.999] - start).norm() < (trained[0.0] - start).norm()


def test_vae_colour_term_puts_the_mean_colour_in_latent_channels_0_to_2():
    images = data.batch(random.Random(3), 32)[0]
    x = base.pixels(images)
    errors = {}
    for weight in (0.0, 1.0):
        vae = base.build_vae(1)
        base.train_vae(vae, steps=40, batch_size=8, seed=1, colour_weight=weight)
        with torch.no_grad():
            mean = vae.encode(x).latent_dist.mean
        errors[weight] = torch.nn.functional.mse_loss(mean[:, :3], torch.nn.functional.avg_pool2d(x, 8)).item()
    # without the term channels 0-2 hold whatever reconstruction found; with it, the 8x8 mean colour
    assert errors[1.0] < 0.2 * errors[0.0], errors
