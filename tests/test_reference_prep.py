"""Preparing a reference image, and the negative-image noise."""
import pytest
import torch

from devtools.comfy_inprocess import pack_module

# loaded as ComfyUI loads it, inside the pack: the glue imports the core relatively
reference_prep = pack_module("comfyui_glue.reference_prep")
contrast_adaptive_sharpening = reference_prep.contrast_adaptive_sharpening
make_noise = reference_prep.make_noise
prepare_reference = reference_prep.prepare_reference


def quadrants(height=60, width=180):
    """A wide image whose left, middle and right thirds are red, green and blue."""
    image = torch.zeros(1, height, width, 3)
    third = width // 3
    for i in range(3):
        image[:, :, i * third : (i + 1) * third, i] = 1.0
    return image


@pytest.mark.parametrize("position, colour", [("left", 0), ("center", 1), ("right", 2)])
def test_crop_position_picks_the_square(position, colour):
    out = prepare_reference(quadrants(), position, "NEAREST")
    assert out.shape == (1, 224, 224, 3)
    assert out[0, 112, 112].argmax() == colour and out[0, 112, 112, colour] == 1.0


def test_top_bottom_and_pad():
    tall = torch.zeros(1, 90, 30, 3)
    tall[:, :30, :, 0] = 1.0
    tall[:, 60:, :, 2] = 1.0
    assert prepare_reference(tall, "top", "NEAREST")[0, 112, 112].argmax() == 0
    assert prepare_reference(tall, "bottom", "NEAREST")[0, 112, 112].argmax() == 2
    padded = prepare_reference(tall, "pad", "NEAREST")
    assert padded[0, 112, 10].sum() == 0 and padded[0, 10, 112, 0] == 1.0  # black bars left/right, nothing cut
    assert prepare_reference(tall, "center", "BICUBIC").shape == (1, 224, 224, 3)
    with pytest.raises(ValueError, match="crop position 'middle' is unknown"):
        prepare_reference(tall, "middle")


def test_sharpening_raises_local_contrast_only_when_asked():
    generator = torch.Generator().manual_seed(0)
    smooth = torch.nn.functional.avg_pool2d(torch.rand(1, 3, 64, 64, generator=generator), 5, 1, 2)
    sharp = contrast_adaptive_sharpening(smooth, 1.0)
    gradient = lambda x: (x[..., 1:, :] - x[..., :-1, :]).abs().mean()  # noqa: E731
    assert gradient(sharp) > 1.2 * gradient(smooth)
    assert torch.equal(prepare_reference(smooth.permute(0, 2, 3, 1), sharpening=0.0),
                       prepare_reference(smooth.permute(0, 2, 3, 1)))


def test_noise_types():
    image = quadrants()
    base = make_noise("fade", 0.0, images=image)
    assert torch.allclose(base, prepare_reference(image, "center", "BICUBIC"))  # strength 0: the reference
    for kind in ("fade", "dissolve", "gaussian", "shuffle"):
        noisy = make_noise(kind, 0.5, images=image, seed=3)
        assert noisy.shape == (1, 224, 224, 3) and 0 <= noisy.min() and noisy.max() <= 1
        assert torch.equal(noisy, make_noise(kind, 0.5, images=image, seed=3))  # seeded
        assert not torch.equal(noisy, make_noise(kind, 0.5, images=image, seed=4))
        assert (noisy - base).abs().mean() > 0.05, kind
    dissolved = make_noise("dissolve", 0.3, images=image)
    changed = ((dissolved - base).abs().sum(-1) > 1e-6).float().mean()
    assert 0.25 < changed < 0.35  # about that share of the pixels replaced
    black = make_noise("gaussian", 1.0)
    assert black.shape == (1, 224, 224, 3) and black.mean() > 0.2  # no image: noise from black
    blurred = make_noise("gaussian", 1.0, blur=9)
    assert blurred.std() < 0.6 * black.std()
    with pytest.raises(ValueError, match="noise type 'salt' is unknown"):
        make_noise("salt", 1.0)
