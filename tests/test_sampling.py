import pytest
import torch

from analysis.models.sampling import parse_int_list, sample


@pytest.mark.parametrize("scheduler", ["ddim", "ddpm"])
def test_same_seed_same_image_whatever_the_batch(tiny_bundle, scheduler):
    labels, seeds = [3, 1, 4, 1], [10, 11, 12, 13]
    full = sample(tiny_bundle, labels, seeds, steps=6, guidance=2.0, scheduler=scheduler)
    pairs = sample(tiny_bundle, labels, seeds, steps=6, guidance=2.0, scheduler=scheduler, batch_size=2)
    single = sample(tiny_bundle, labels[2:3], seeds[2:3], steps=6, guidance=2.0, scheduler=scheduler)
    torch.testing.assert_close(full.images, pairs.images, atol=1e-4, rtol=0)
    torch.testing.assert_close(full.images[2:3], single.images, atol=1e-4, rtol=0)
    other = sample(tiny_bundle, [3], [99], steps=6, guidance=2.0, scheduler=scheduler)
    assert (other.images - full.images[:1]).abs().max() > 1e-3  # a different seed is a different image


def test_vae_images_have_image_shape_and_range(tiny_bundle):
    out = sample(tiny_bundle, [0, 9], [0, 1], steps=3, guidance=1.5)
    assert out.images.shape == (2, *tiny_bundle.image_shape)
    assert out.images.dtype == torch.float32 and out.images.min() >= 0 and out.images.max() <= 1
    assert out.latents.shape == (2, *tiny_bundle.latent_shape)


def test_bundled_cpu_sampling_shape_and_range(bundled):
    out = sample(bundled, [0, 1, 2], [0, 0, 0], steps=10)
    assert out.images.shape == (3, 1, 16, 16)
    assert out.images.min() >= 0 and out.images.max() <= 1
    assert out.images.std() > 0.1  # digits, not a flat field


def test_recording_calibration_inputs(tiny_bundle):
    steps_seen = []
    out = sample(tiny_bundle, [1, 2], [0, 1], steps=5, guidance=3.0, record=[0, 4],
                 on_step=lambda d, n: steps_seen.append((d, n)))
    cal = out.calibration
    assert steps_seen[-1] == (5, 5) and len(steps_seen) == 5
    # two steps x (2 conditional + 2 unconditional) inputs
    assert len(cal) == 8 and cal.x.shape == (8, 4, 8, 8)
    assert cal.y.tolist() == [1, 2, 10, 10] * 2
    assert len(cal.timesteps) == 2 and cal.timesteps[0] > cal.timesteps[1]
    assert cal.step.tolist() == [0] * 4 + [4] * 4


def test_no_guidance_records_conditional_only(tiny_bundle):
    out = sample(tiny_bundle, [1, 2], [0, 1], steps=2, guidance=1.0, record="all")
    assert len(out.calibration) == 4 and 10 not in out.calibration.y.tolist()


@pytest.mark.slow
def test_bundled_label_agreement_small_batch(bundled):
    from analysis.evaluation.classifier import label_agreement

    labels = [c for c in range(10) for _ in range(3)]
    out = sample(bundled, labels, list(range(30)), steps=50)
    assert label_agreement(out.images, labels) >= 0.8


def test_bad_sampling_arguments(tiny_bundle):
    with pytest.raises(ValueError, match="out of range"):
        sample(tiny_bundle, [10], [0])
    with pytest.raises(ValueError, match="one seed per image"):
        sample(tiny_bundle, [1, 2], [0])
    with pytest.raises(ValueError, match="scheduler"):
        sample(tiny_bundle, [1], [0], steps=2, scheduler="euler")


def test_parse_int_list():
    assert parse_int_list("0,1,5-7") == [0, 1, 5, 6, 7]
    for bad in ["a", "3-1", "", "1-x"]:
        with pytest.raises(ValueError):
            parse_int_list(bad)
