import math

import numpy as np
import pytest
import torch

from fusion import metrics
from fusion.evaluation.scoring import read_grey
from fusion.metric_names import EIGHT, METRICS
from tests import reference_metrics as ref


def test_en_of_two_level_image_is_one_bit():
    f = torch.zeros(8, 8)
    f[:, :4] = 200
    assert metrics.en(f).item() == pytest.approx(1.0)
    assert metrics.en(torch.full((5, 5), 9.0)).item() == 0.0


def test_sd_and_sf_of_a_ramp():
    ramp = torch.arange(10, dtype=torch.float64).repeat(6, 1)  # columns 0..9
    assert metrics.sf(ramp).item() == pytest.approx(1.0)  # dx = 1 everywhere, dy = 0
    assert metrics.sd(ramp).item() == pytest.approx(np.std(np.arange(10)))
    assert metrics.ag(ramp).item() == pytest.approx(math.sqrt(0.5))


def test_mi_of_image_with_itself_is_twice_its_entropy_in_nats():
    rng = np.random.default_rng(0)
    img = torch.from_numpy(rng.integers(0, 256, (64, 64)).astype(np.float64))
    self_mi = metrics.mi(img, img, img).item()
    assert self_mi == pytest.approx(2 * metrics.en(img).item() * math.log(2))
    bits = metrics.mi(img, img, img, metrics.MetricOptions(mi_unit="bits")).item()
    assert bits == pytest.approx(self_mi / math.log(2))


def test_ssim_and_scd_of_identical_and_constant_images():
    rng = np.random.default_rng(1)
    img = torch.from_numpy(rng.uniform(0, 255, (32, 32)))
    assert metrics.ssim(img, img, img).item() == pytest.approx(2.0)
    flat = torch.full((32, 32), 128.0)
    values = metrics.compute(flat, flat, flat)
    assert all(torch.isfinite(v).all() for v in values.values())
    assert values["VIF"].item() == 2.0  # NaN (flat reference) counts as 1, as published
    assert values["SCD"].item() == 0.0 and values["CC"].item() == 0.0
    black = torch.zeros(32, 32)  # zero padding: no Sobel edge anywhere, Qabf 0/0 -> 0
    assert metrics.qabf(black, black, black).item() == 0.0


def _images(rng, shape=(61, 77)):
    a = np.round(rng.uniform(0, 255, shape))
    b = np.round(np.clip(a * 0.3 + rng.normal(120, 40, shape), 0, 255))
    f = np.round((a + b) / 2 + rng.normal(0, 5, shape)).clip(0, 255)
    return f, a, b


def test_agrees_with_scikit_learn_and_scikit_image_on_random_images():
    f, a, b = _images(np.random.default_rng(2))
    ours = metrics.compute(torch.from_numpy(f), torch.from_numpy(a), torch.from_numpy(b))
    assert ours["MI"].item() == pytest.approx(ref.mi(f, a, b), rel=1e-9)
    assert ours["SSIM"].item() == pytest.approx(ref.ssim(f, a, b), rel=1e-9)
    textbook = metrics.ssim(torch.from_numpy(f), torch.from_numpy(a), torch.from_numpy(b),
                            metrics.MetricOptions(ssim_data_range=255)).item()
    assert textbook == pytest.approx(ref.ssim(f, a, b, data_range=255), rel=1e-9)
    expected = ref.all_eight(f, a, b)
    for name in ("EN", "SF", "SCD", "VIF"):
        assert ours[name].item() == pytest.approx(expected[name], rel=1e-9), name
    assert ours["Qabf"].item() == pytest.approx(expected["Qabf"], rel=1e-6)  # float32 Sobel


def test_batched_equals_one_by_one():
    rng = np.random.default_rng(3)
    triples = [_images(rng, (40, 50)) for _ in range(3)]
    stacked = [torch.from_numpy(np.stack(x)) for x in zip(*triples, strict=True)]
    batch = metrics.compute(*stacked)
    for i, (f, a, b) in enumerate(triples):
        single = metrics.compute(torch.from_numpy(f), torch.from_numpy(a), torch.from_numpy(b))
        for name in METRICS:
            assert batch[name][i].item() == pytest.approx(single[name].item(), rel=1e-12)


def test_half_a_percent_agreement_on_real_pairs(shared_data):
    """Real TNO and MRI-CT pairs, fused by mean and max, against the NumPy/SciPy reference."""
    cases = [("tno", "ir", "vi", "01"), ("tno", "ir", "vi", "13"), ("mri_ct", "mri", "ct", "11")]
    for dataset, ma, mb, stem in cases:
        folder = shared_data / dataset
        a = read_grey(next((folder / ma).glob(f"{stem}.*")))
        b = read_grey(next((folder / mb).glob(f"{stem}.*")))
        for f in (np.round((a + b) / 2), np.maximum(a, b)):
            ours = metrics.compute(*(torch.from_numpy(x) for x in (f, a, b)), names=EIGHT)
            expected = ref.all_eight(f, a, b)
            for name in EIGHT:
                assert ours[name].item() == pytest.approx(expected[name], rel=5e-3), (
                    dataset, stem, name)
