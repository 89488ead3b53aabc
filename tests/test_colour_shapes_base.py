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
