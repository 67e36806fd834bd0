"""Every registered family: any size, grey and colour, exact tiles, and each loss term on
hand-made tensors whose value is known."""

import copy
import math

import numpy as np
import pytest
import torch

from fusion.data.images import SourceImage, rgb_to_ycbcr, to_unit
from fusion.inference.fuse import TileSpec, TorchEngine, fuse_images
from fusion.models import create_model, get_family, list_families, losses
from tests.conftest import TINY_NETS, textured

FAMILIES = list_families()


@pytest.fixture(scope="module")
def engines():
    torch.manual_seed(0)
    return {f: TorchEngine(create_model(f, **TINY_NETS[f]).eval(), get_family(f))
            for f in FAMILIES}


def test_the_registry_lists_the_three_families():
    assert FAMILIES == ["cddfuse", "dae-fuse", "mfdce-fuse"]
    for name in FAMILIES:
        family = get_family(name)
        assert family.name == name and len(family.phases) == 2
        assert family.config().net == type(family.config().net)()  # typed defaults


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("size", [(301, 496), (17, 9)])
def test_any_size_grey_and_rgb(engines, family, size):
    engine = engines[family]
    a = SourceImage(textured(*size, seed=1))
    grey = fuse_images(engine, a, SourceImage(textured(*size, seed=3))).pixels
    colour = fuse_images(engine, a, SourceImage(textured(*size, seed=2, rgb=True))).pixels
    assert grey.shape == size and grey.dtype == np.uint8
    assert colour.shape == (*size, 3)


def test_colour_fusion_keeps_the_visible_chroma(engines):
    vis = textured(64, 80, seed=2, rgb=True)
    fused = fuse_images(engines["dae-fuse"], SourceImage(textured(64, 80, 1)),
                        SourceImage(vis)).pixels
    cbcr_in, cbcr_out = rgb_to_ycbcr(to_unit(vis))[..., 1:], rgb_to_ycbcr(to_unit(fused))[..., 1:]
    # chroma survives up to 8-bit rounding and the clipping of out-of-gamut colours
    assert np.abs(cbcr_out - cbcr_in).mean() < 0.02


def test_grey_content_rgb_gives_grey_and_16_bit_is_kept(engines):
    engine = engines["dae-fuse"]
    grey_rgb = np.repeat(textured(40, 40, seed=4)[..., None], 3, axis=2)
    out = fuse_images(engine, SourceImage(grey_rgb), SourceImage(textured(40, 40, 5))).pixels
    assert out.ndim == 2
    deep = fuse_images(engine, SourceImage(textured(40, 40, 6, bits=16)),
                       SourceImage(textured(40, 40, 7, rgb=True))).pixels
    assert deep.dtype == np.uint16 and deep.shape == (40, 40, 3)  # 16-bit grey IR + RGB


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("size", [(150, 130), (97, 301)])
def test_tiles_give_the_whole_image_result(engines, family, size):
    from fusion.inference.tiling import fuse_tiled

    model = engines[family].model
    assert get_family(family).exact_tiling
    a, b = torch.rand(1, 1, *size), torch.rand(1, 1, *size)
    with torch.no_grad():
        whole = model.fuse(a, b)
        tiled = fuse_tiled(model, a, b, 96, 32)
        # without a halo the convolutions see the tile edges: the halo is what makes it exact
        no_halo = fuse_tiled(model, a, b, 48, 0)
    assert tiled.shape == a.shape
    assert (whole - tiled).abs().max().item() < 1e-5
    assert (whole - no_halo).abs().max().item() > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_the_inference_form_fuses_as_the_trained_network(family):
    """fold_norms (each norm's affine moved into the convolutions it feeds) is what the
    engines and the ONNX export run: same output, and no norm keeps its affine."""
    from fusion.models.layers import LayerNorm2d, fold_norms

    torch.manual_seed(1)
    model = create_model(family, **TINY_NETS[family]).eval()
    for norm in (m for m in model.modules() if isinstance(m, LayerNorm2d)):
        with torch.no_grad():  # away from the initial 1 and 0, so that folding matters
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.5, 0.5)
    folded = fold_norms(copy.deepcopy(model))
    assert all(m.weight is None for m in folded.modules() if isinstance(m, LayerNorm2d))
    a, b = torch.rand(1, 1, 70, 90), torch.rand(1, 1, 70, 90)
    with torch.no_grad():
        assert (model.fuse(a, b) - folded.fuse(a, b)).abs().max().item() < 1e-5


@pytest.mark.parametrize("scale", [1, 2, 3])
def test_shuffled_conv_is_a_conv_after_the_pixel_shuffle(scale):
    from fusion.models.layers import shuffled_conv

    torch.manual_seed(2)
    conv = torch.nn.Conv2d(3, 2, 3, padding=1)
    x = torch.randn(2, 3 * scale ** 2, 11, 7)
    with torch.no_grad():
        direct = conv(torch.nn.functional.pixel_shuffle(x, scale))
        assert (shuffled_conv(conv, x, scale) - direct).abs().max().item() < 1e-5


def test_channel_layer_norm_is_layer_norm_over_channels():
    from fusion.models.layers import LayerNorm2d

    torch.manual_seed(3)
    norm = LayerNorm2d(6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
        x = torch.randn(2, 6, 5, 4) * 3 + 1
        per_pixel = torch.nn.functional.layer_norm(x.permute(0, 2, 3, 1), (6,), norm.weight,
                                                   norm.bias, norm.eps).permute(0, 3, 1, 2)
        assert (norm(x) - per_pixel).abs().max().item() < 1e-5


def test_tile_cores_partition_the_padded_image():
    from fusion.inference.tiling import _tiles

    tiles = _tiles(160, 304, size=96, halo=32, grid=16)
    assert len(tiles) > 4
    cover = torch.zeros(160, 304)
    for t in tiles:
        assert t.y0 % 16 == t.x0 % 16 == 0 and t.y1 - t.y0 <= 96 and t.x1 - t.x0 <= 96
        assert t.y0 <= t.core_y[0] and t.core_y[1] <= t.y1
        cover[t.core_y[0]:t.core_y[1], t.core_x[0]:t.core_x[1]] += 1
    assert torch.equal(cover, torch.ones_like(cover))


def test_windows_cover_the_image_once_and_cross_fade(capsys):
    """Overlapping windows (``fusion.inference.windows``): a pixelwise fusion comes back
    exactly, every window has one shape (its side, the mirrored margin included), and
    windows that disagree (a constant each) meet in ramps, not at a seam."""
    from fusion.inference.windows import fuse_windows

    rng = np.random.default_rng(0)
    a, b = rng.random((700, 1000), np.float32), rng.random((700, 1000), np.float32)
    shapes = []

    def pixelwise(x, y):
        shapes.append(x.shape)
        return np.maximum(x, y)

    out = fuse_windows(pixelwise, a, b, size=256, overlap=64, margin=16)
    assert np.abs(out - np.maximum(a, b)).max() < 1e-6
    assert len(shapes) == 24 and set(shapes) == {(256, 256)}  # one shape, margin included
    assert "fused in 24 overlapping windows of 256 pixels" in capsys.readouterr().err

    offsets = iter(np.linspace(0, 1, 24))
    out = fuse_windows(lambda x, y: np.full_like(x, next(offsets)), a, b, 256, 64, 16)
    steps = max(np.abs(np.diff(out, axis=axis)).max() for axis in (0, 1))
    assert steps < 0.3 / 32  # a hard cut would step by up to 0.26 (row neighbours)


def test_precision_auto_is_bf16_in_windows_only_where_native_and_close_to_fp32(engines):
    """``--precision auto``: windows (above ``exact_pixels``) run in bf16 where it is
    native, the exact path stays fp32; bf16 stays within a grey level of fp32 on average."""
    from fusion.device import native_bf16
    from fusion.errors import FusionError

    model, family = engines["dae-fuse"].model, get_family("dae-fuse")
    a, b = (textured(160, 200, seed=s) / 255.0 for s in (1, 2))
    windows = TileSpec(exact_pixels=0, window=128, overlap=8)
    fused = {p: TorchEngine(model, family, windows, precision=p)(a, b)
             for p in ("auto", "fp32", "bf16")}
    assert np.abs(fused["bf16"] - fused["fp32"]).mean() * 255 < 1.0
    assert not np.array_equal(fused["bf16"], fused["fp32"])  # bf16 did run
    native = native_bf16(torch.device("cpu"))
    assert np.array_equal(fused["auto"], fused["bf16" if native else "fp32"])
    exact = {p: TorchEngine(model, family, precision=p)(a, b) for p in ("auto", "fp32")}
    assert np.array_equal(exact["auto"], exact["fp32"])
    with pytest.raises(FusionError, match="--precision must be one of auto, fp32, bf16"):
        TorchEngine(model, family, precision="fp16")


def test_a_tile_or_window_smaller_than_its_context_is_refused():
    from fusion.errors import FusionError

    with pytest.raises(FusionError, match="must exceed twice --halo 48"):
        TileSpec(96, 48)
    with pytest.raises(FusionError, match="--window-overlap 64 by at least 32"):
        TileSpec(window=160, overlap=64)


def test_discriminators_give_one_logit_per_image():
    from fusion.models.dae_fuse import Net
    from fusion.models.dae_fuse.net import build_critic

    d1, d2 = build_critic(Net(**TINY_NETS["dae-fuse"]))(torch.rand(3, 1, 48, 48),
                                                         torch.rand(3, 1, 64, 64))
    assert d1.shape == d2.shape == (3,)


# -- shared loss terms ---------------------------------------------------------------------

def test_correlation_loss_identical_vs_independent():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 16, 16)
    noise = torch.randn(2, 4, 16, 16)
    assert losses.correlation(x, x).item() == pytest.approx(1.0, abs=1e-5)
    assert abs(losses.correlation(x, noise).item()) < 0.1
    # identical detail features are penalised, identical base features rewarded
    same_detail = losses.decomposition_loss(x, x, x, noise).item()
    assert same_detail == pytest.approx(1.0 / (losses.correlation(x, noise).item() + 1.01))
    assert losses.decomposition_loss(x, noise, x, x).item() < 0.01


def test_intensity_texture_and_content_losses_known_values():
    a = torch.rand(2, 1, 32, 32)
    b = torch.rand(2, 1, 32, 32)
    assert losses.intensity_loss(torch.maximum(a, b), a, b).item() == 0.0
    assert losses.intensity_loss(torch.zeros_like(a), a, a).item() == pytest.approx(
        a.mean().item())
    flat = torch.full_like(a, 0.5)
    # low-pass intensity: a constant image against constant sources is exact at any sigma
    assert losses.intensity_loss(flat, flat * 0.4, flat, sigma=3.0).item() == pytest.approx(
        0.0, abs=1e-6)
    assert losses.intensity_loss(flat * 0.2, flat, flat, sigma=3.0).item() == pytest.approx(0.4)
    assert losses.texture_loss(flat, flat, flat).item() == pytest.approx(0.0, abs=1e-6)
    assert losses.texture_loss(flat, a, b).item() > 0.1
    assert losses.content_loss(a, a).item() == pytest.approx(0.0, abs=1e-5)
    assert losses.content_loss(a, 1 - a).item() > 1.0
    assert losses.gradient_loss(a, a).item() == 0.0


def test_adversarial_losses():
    confident_real = torch.full((4,), 20.0)
    confident_fake = torch.full((4,), -20.0)
    assert losses.generator_adversarial(confident_real, confident_real).item() < 1e-6
    assert losses.discriminator_loss(confident_real, confident_fake, confident_real,
                                     confident_fake).item() < 1e-6
    assert losses.bce(torch.zeros(3), True).item() == pytest.approx(np.log(2))


def test_info_nce_known_values():
    eye = torch.eye(4)
    # each row matches only itself: loss -> 0 as the temperature sharpens
    assert losses.info_nce(eye, eye, temperature=0.01).item() < 1e-6
    # all rows alike: chance level, log N
    same = torch.ones(4, 3)
    assert losses.info_nce(same, same).item() == pytest.approx(math.log(4))


# -- family-specific terms -----------------------------------------------------------------

def test_cddfuse_fusion_gradient_is_the_unnormalised_sobel_l1():
    from fusion.models.cddfuse.losses import sobel_l1

    ramp = torch.arange(8.0).repeat(8, 1)[None, None]  # d/dx = 1 everywhere
    g = sobel_l1(ramp)[0, 0, 2:-2, 2:-2]  # interior: |Gx| = (1+2+1) x a step of 2, Gy = 0
    assert torch.allclose(g, torch.full_like(g, 8.0))


def test_cddfuse_losses_vanish_for_a_perfect_reconstruction():
    from fusion.models.cddfuse import ReconstructionLoss
    from fusion.models.cddfuse.losses import losses_for

    a, b = torch.rand(2, 1, 32, 32), torch.rand(2, 1, 32, 32)
    feats = torch.randn(2, 4, 16, 16)
    out = {"rec": (a, b), "base": (feats, feats), "detail": (feats, -feats)}
    terms = losses_for(1, a, b, out, ReconstructionLoss(), None)
    assert terms["mse"].item() == terms["grad"].item() == 0.0
    assert terms["ssim"].item() == pytest.approx(0.0, abs=1e-5)
    # detail features perfectly anti-correlated (CC^2 = 1), base features identical (CC = 1)
    assert terms["decomp"].item() == pytest.approx(1 / 2.01, rel=1e-4)


def test_mfdce_contribution_is_the_share_of_private_energy():
    from fusion.models.mfdce_fuse.net import Contribution

    c = Contribution(smooth=3)
    strong, weak = torch.full((1, 4, 8, 8), 2.0), torch.full((1, 4, 8, 8), 1.0)
    assert c(strong, weak).abs().max().item() == 0.0  # untrained: the brighter-base rule
    with torch.no_grad():
        c.gamma.fill_(1.0)
    w = torch.sigmoid(c(strong, weak))  # energies 4 and 1, sharpness 1: 4 / (4 + 1)
    assert torch.allclose(w, torch.full_like(w, 0.8))
    assert torch.allclose(torch.sigmoid(c(weak, weak)), torch.full_like(w, 0.5))
    fused = create_model("mfdce-fuse", **TINY_NETS["mfdce-fuse"]).explain(
        torch.zeros(1, 1, 40, 40), torch.zeros(1, 1, 40, 40))
    assert fused["fused"].abs().max().item() == 0.0  # both sources dark: the fusion is dark
    assert fused["contribution"].shape == (1, 1, 40, 40)


def test_mfdce_disentangle_loss_known_values():
    from fusion.models.mfdce_fuse.losses import disentangle_loss

    common = torch.eye(4).reshape(4, 4, 1, 1).expand(4, 4, 2, 2)  # one direction per patch
    private_a = torch.zeros(4, 4, 2, 2)
    private_a[:, 0] = 1.0
    private_b = torch.zeros(4, 4, 2, 2)
    private_b[:, 1] = 1.0  # orthogonal to A's private part
    out = {"common": (common, common), "private": (private_a, private_b)}
    # InfoNCE ~ 0 (temperature 0.01), privates orthogonal to each other; each private part
    # is parallel to the common part of exactly one patch in four (cos^2 = 1 there)
    assert disentangle_loss(out, 0.01).item() == pytest.approx(0.25, abs=1e-4)


def test_the_heads_filter_removes_a_2x2_pattern_and_keeps_smooth_maps():
    """The head's logits pass ``binomial``: a 2x2 checkerboard (what a head on a
    pixel-unshuffled grid can leave) goes to its mean, a constant and a ramp stay (inside
    the border), and the filter is the [1, 2, 1] / 4 kernel each way."""
    from fusion.models.layers import binomial

    checker = torch.zeros(1, 3, 16, 16)
    checker[..., ::2, ::2] = checker[..., 1::2, 1::2] = 1.0
    assert torch.allclose(binomial(checker)[..., 1:-1, 1:-1], torch.full((1, 3, 14, 14), 0.5))
    flat = torch.full((1, 3, 9, 9), 0.7)
    assert torch.allclose(binomial(flat), flat)
    ramp = torch.arange(10.0).view(1, 1, 1, 10).expand(1, 1, 6, 10)
    assert torch.allclose(binomial(ramp)[..., 1:-1], ramp[..., 1:-1])
    impulse = torch.zeros(1, 1, 5, 5)
    impulse[..., 2, 2] = 16.0
    k = torch.tensor([1.0, 2.0, 1.0])
    assert torch.allclose(binomial(impulse)[0, 0, 1:4, 1:4], torch.outer(k, k))
