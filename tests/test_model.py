import numpy as np
import pytest
import torch

from fusion import losses
from fusion.imaging import SourceImage, rgb_to_ycbcr, to_float
from fusion.inference import TileSpec, fuse_images, fuse_tensors
from fusion.model import DAEFuse
from fusion.params import ModelParams
from fusion.train import Discriminators
from tests.conftest import TINY_MODEL, textured


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return DAEFuse(ModelParams(**TINY_MODEL)).eval()


@pytest.mark.parametrize("size", [(301, 496), (255, 257), (17, 9)])
def test_any_size_grey_and_rgb(tiny_model, size):
    a = SourceImage(textured(*size, seed=1))
    b_rgb = SourceImage(textured(*size, seed=2, rgb=True))
    grey = fuse_images(tiny_model, a, SourceImage(textured(*size, seed=3)))
    colour = fuse_images(tiny_model, a, b_rgb)
    assert grey.shape == size and grey.dtype == np.uint8
    assert colour.shape == (*size, 3)
    rec, hf, lf = tiny_model.reconstruct(torch.rand(2, 1, *size))
    assert rec.shape == (2, 1, *size) and hf.shape[0] == lf.shape[0] == 2


def test_colour_fusion_keeps_the_visible_chroma(tiny_model):
    a = SourceImage(textured(64, 80, seed=1))
    vis = textured(64, 80, seed=2, rgb=True)
    fused = fuse_images(tiny_model, a, SourceImage(vis))
    cbcr_in = rgb_to_ycbcr(to_float(vis))[1:]
    cbcr_out = rgb_to_ycbcr(to_float(fused))[1:]
    # chroma survives up to 8-bit rounding and the clipping of out-of-gamut colours
    assert (cbcr_out - cbcr_in).abs().mean() < 0.02


def test_grey_content_rgb_gives_grey_and_16_bit_is_kept(tiny_model):
    grey_rgb = np.repeat(textured(40, 40, seed=4)[..., None], 3, axis=2)
    out = fuse_images(tiny_model, SourceImage(grey_rgb), SourceImage(textured(40, 40, 5)))
    assert out.ndim == 2
    deep = fuse_images(tiny_model, SourceImage(textured(40, 40, 6, bits=16)),
                       SourceImage(textured(40, 40, 7, bits=16)))
    assert deep.dtype == np.uint16


@pytest.mark.parametrize("size", [(150, 130), (97, 301)])
def test_tiles_give_the_whole_image_result(tiny_model, size):
    a, b = torch.rand(1, 1, *size), torch.rand(1, 1, *size)
    whole = tiny_model.fuse(a, b)
    tiled = fuse_tensors(tiny_model, a, b, TileSpec(size=80, halo=24))
    assert tiled.shape == a.shape
    assert (whole - tiled).abs().max().item() < 1e-5
    # without a halo the convolutions see the tile edges: the halo is what makes it exact
    no_halo = fuse_tensors(tiny_model, a, b, TileSpec(size=32, halo=0))
    assert (whole - no_halo).abs().max().item() > 1e-3


def test_tile_cores_partition_the_padded_image():
    from fusion.tiling import _tiles

    tiles = _tiles(160, 304, size=96, halo=32, grid=16)
    assert len(tiles) > 4
    cover = torch.zeros(160, 304)
    for t in tiles:
        assert t.y0 % 16 == t.x0 % 16 == 0 and t.y1 - t.y0 <= 96 and t.x1 - t.x0 <= 96
        assert t.y0 <= t.core_y[0] and t.core_y[1] <= t.y1
        cover[t.core_y[0]:t.core_y[1], t.core_x[0]:t.core_x[1]] += 1
    assert torch.equal(cover, torch.ones_like(cover))


def test_discriminators_give_one_logit_per_image():
    d1, d2 = Discriminators(ModelParams(**TINY_MODEL))(torch.rand(3, 1, 48, 48),
                                                       torch.rand(3, 1, 64, 64))
    assert d1.shape == d2.shape == (3,)


def test_correlation_loss_identical_vs_independent():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 16, 16)
    noise = torch.randn(2, 4, 16, 16)
    assert losses.correlation(x, x).item() == pytest.approx(1.0, abs=1e-5)
    assert abs(losses.correlation(x, noise).item()) < 0.1
    # identical high-frequency features are penalised, identical low-frequency rewarded
    same_hf = losses.decomposition_loss(x, x, x, noise).item()
    assert same_hf == pytest.approx(1.0 / (losses.correlation(x, noise).item() + 1.01))
    assert losses.decomposition_loss(x, noise, x, x).item() < 0.01


def test_intensity_texture_and_content_losses_known_values():
    a = torch.rand(2, 1, 32, 32)
    b = torch.rand(2, 1, 32, 32)
    assert losses.intensity_loss(torch.maximum(a, b), a, b).item() == 0.0
    assert losses.intensity_loss(torch.zeros_like(a), a, a).item() == pytest.approx(
        a.mean().item())
    flat = torch.full_like(a, 0.5)
    assert losses.texture_loss(flat, flat, flat).item() == pytest.approx(0.0, abs=1e-6)
    assert losses.texture_loss(flat, a, b).item() > 0.1
    assert losses.content_loss(a, a).item() == pytest.approx(0.0, abs=1e-5)
    assert losses.content_loss(a, 1 - a).item() > 1.0


def test_adversarial_losses():
    confident_real = torch.full((4,), 20.0)
    confident_fake = torch.full((4,), -20.0)
    assert losses.generator_adversarial(confident_real, confident_real).item() < 1e-6
    assert losses.discriminator_loss(confident_real, confident_fake, confident_real,
                                     confident_fake).item() < 1e-6
    assert losses.bce(torch.zeros(3), True).item() == pytest.approx(np.log(2))
