"""The fusion metrics papers report, in torch (CPU or GPU), batched over same-size images,
and differentiable where the definition allows (SD, SF, SCD, VIF, Qabf, SSIM, CC, MSE):
evaluation scores with them and the families' losses train on them, one definition for both.

Inputs are greyscale images on the 0-255 scale, ``(H, W)`` or ``(N, H, W)``; every metric
returns one value per image (float64). Definitions follow the Python evaluator behind the
published MMIF tables (the papers in ../shared/papers), so our numbers can stand next to theirs:

- EN: entropy (bits) of the 256-bin histogram of F rounded to uint8.
- SD: population standard deviation. SF: spatial frequency from horizontal/vertical
  first differences. AG: mean of sqrt((Gx^2 + Gy^2) / 2) with central differences inside
  and one-sided differences at the border (``np.gradient``).
- MI: MI(F, A) + MI(F, B) from joint histograms of integer grey levels, natural log (nats)
  like ``sklearn.metrics.mutual_info_score``. Textbook variant: ``mi_unit='bits'``.
- SCD: corr(A, F - B) + corr(B, F - A), Pearson.
- VIF: VIF(A, F) + VIF(B, F), pixel-domain multi-scale VIF (Sheikh & Bovik): 4 scales,
  Gaussian windows N = 2^(5-s)+1, sd = N/5, noise variance 2, 'valid' filtering,
  filter-then-subsample between scales, the evaluator's variance guards (eps 1e-10); a NaN
  (0/0 on a flat reference) counts as 1, as there. Images too small for the coarser scales
  (under about 60 pixels a side) use the scales that fit.
- Qabf: Xydeas-Petrovic edge preservation, 3x3 Sobel ('same', zero padding), evaluator
  constants, weights gA, gB (L=1). Where gA == gF the strength ratio is gF itself (the
  evaluator's rule; the textbook ratio would be 1).
- SSIM: SSIM(F, A) + SSIM(F, B), scikit-image style (7x7 uniform window, K1 0.01, K2 0.03,
  sample covariance, mean over the interior) with data_range = 2 as in the published numbers
  (old scikit-image default for floats). Textbook variant: ``ssim_data_range=255``.
- Extras: CC = mean of corr(A, F), corr(B, F); MSE = mean of MSE(A, F), MSE(B, F);
  PSNR = 10 log10(max(F)^2 / MSE) (the evaluator's peak = max of F).

Degenerate inputs give defined values, never NaN: a correlation with a constant image is 0,
Qabf with no edge in either source is 0, PSNR is capped to [0, 100] dB.
We score images exactly as given: no min-max stretching (which some published code does,
inflating SD, EN and SF).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fusion.metric_names import METRICS
from fusion.params import MetricParams as MetricOptions

EPS = 1e-10
PUBLISHED = MetricOptions()  # the definitions of the published evaluator
DTYPE = torch.float64


def _batch(x: torch.Tensor) -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.ndim == 2:
        x = x.unsqueeze(0)
    if x.ndim != 3:
        raise ValueError(f"expected (H, W) or (N, H, W) images, got shape {tuple(x.shape)}")
    return x.to(DTYPE)


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1)


def _safe(x: torch.Tensor, ok: torch.Tensor, fill: float = 1.0) -> torch.Tensor:
    """``x`` where ``ok``, else ``fill``: the operand of a guarded division or root, so that
    the branch ``torch.where`` discards has no infinite gradient either (values unchanged)."""
    return torch.where(ok, x, torch.full_like(x, fill))


def _corr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Pearson correlation per image; 0 where either image is constant."""
    xc = _flat(x) - _flat(x).mean(1, keepdim=True)
    yc = _flat(y) - _flat(y).mean(1, keepdim=True)
    den2 = (xc * xc).sum(1) * (yc * yc).sum(1)
    num = (xc * yc).sum(1)
    ok = den2 > 0
    return torch.where(ok, num / torch.sqrt(_safe(den2, ok)), torch.zeros_like(num))


def en(f: torch.Tensor) -> torch.Tensor:
    f = _batch(f)
    levels = torch.round(f).clamp(0, 255).to(torch.int64)
    offsets = torch.arange(f.shape[0], device=f.device).view(-1, 1, 1) * 256
    hist = torch.bincount((levels + offsets).flatten(), minlength=256 * f.shape[0])
    p = hist.view(f.shape[0], 256).to(DTYPE) / (f.shape[1] * f.shape[2])
    return -(p * torch.log2(torch.where(p > 0, p, torch.ones_like(p)))).sum(1)


def sd(f: torch.Tensor) -> torch.Tensor:
    return _flat(_batch(f)).std(1, correction=0)


def sf(f: torch.Tensor) -> torch.Tensor:
    f = _batch(f)
    dx = f[:, :, 1:] - f[:, :, :-1]
    dy = f[:, 1:, :] - f[:, :-1, :]
    return torch.sqrt(_flat(dx * dx).mean(1) + _flat(dy * dy).mean(1))


def ag(f: torch.Tensor) -> torch.Tensor:
    f = _batch(f)
    gy, gx = torch.gradient(f, dim=(1, 2))
    return _flat(torch.sqrt((gx * gx + gy * gy) / 2)).mean(1)


def _mi(x: torch.Tensor, y: torch.Tensor, base: float) -> torch.Tensor:
    n, pixels = x.shape[0], x.shape[1] * x.shape[2]
    xi = torch.round(x).clamp(0, 255).to(torch.int64)
    yi = torch.round(y).clamp(0, 255).to(torch.int64)
    offsets = torch.arange(n, device=x.device).view(-1, 1, 1) * 65536
    joint = torch.bincount((xi * 256 + yi + offsets).flatten(), minlength=65536 * n)
    p = joint.view(n, 256, 256).to(DTYPE) / pixels
    px, py = p.sum(2, keepdim=True), p.sum(1, keepdim=True)
    ratio = torch.where(p > 0, p / (px * py).clamp_min(1e-300), torch.ones_like(p))
    return (p * torch.log(ratio)).sum((1, 2)) / math.log(base)


def mi(f, a, b, options: MetricOptions = PUBLISHED) -> torch.Tensor:
    f, a, b = _batch(f), _batch(a), _batch(b)
    base = 2.0 if options.mi_unit == "bits" else math.e
    return _mi(f, a, base) + _mi(f, b, base)


def scd(f, a, b) -> torch.Tensor:
    f, a, b = _batch(f), _batch(a), _batch(b)
    return _corr(a, f - b) + _corr(b, f - a)


def cc(f, a, b) -> torch.Tensor:
    f, a, b = _batch(f), _batch(a), _batch(b)
    return (_corr(a, f) + _corr(b, f)) / 2


def mse(f, a, b) -> torch.Tensor:
    f, a, b = _batch(f), _batch(a), _batch(b)
    return (_flat((a - f) ** 2).mean(1) + _flat((b - f) ** 2).mean(1)) / 2


def psnr(f, a, b) -> torch.Tensor:
    f = _batch(f)
    peak = _flat(f).amax(1)
    value = 10 * torch.log10(peak * peak / mse(f, a, b))
    return torch.nan_to_num(value, nan=0.0, posinf=100.0, neginf=0.0).clamp(0.0, 100.0)


def _gauss_1d(n: int, device: torch.device) -> torch.Tensor:
    """1-D factor of the MATLAB-style ``fspecial('gaussian', n, n/5)`` window (it is separable;
    MATLAB's zeroing of entries below eps*max never triggers at these sizes)."""
    sd_ = n / 5.0
    x = torch.arange(n, dtype=DTYPE, device=device) - (n - 1) / 2
    g = torch.exp(-(x * x) / (2 * sd_ * sd_))
    return g / g.sum()


def _taps(x: torch.Tensor, dim: int, g: list[float], step: int) -> torch.Tensor:
    """'valid' 1-D filtering along ``dim``, every ``step``-th output, as a sum of shifted
    slices accumulated in place (float64 has no fast convolution kernel on CPU)."""
    n = (x.shape[dim] - len(g)) // step + 1
    out = x.narrow(dim, 0, (n - 1) * step + 1)[_every(dim, x.ndim, step)] * g[0]
    for t in range(1, len(g)):
        out.add_(x.narrow(dim, t, (n - 1) * step + 1)[_every(dim, x.ndim, step)], alpha=g[t])
    return out


def _every(dim: int, ndim: int, step: int) -> tuple[slice, ...]:
    index = [slice(None)] * ndim
    index[dim % ndim] = slice(None, None, step)
    return tuple(index)


def _filter_valid(x: torch.Tensor, g: torch.Tensor, step: int = 1) -> torch.Tensor:
    """'valid' 2-D filtering of (..., H, W) by the separable window outer(g, g), keeping every
    ``step``-th output row and column (filter-then-subsample without the wasted work)."""
    taps = g.tolist()
    return _taps(_taps(x, -1, taps, step), -2, taps, step)


def _box_mean_valid(x: torch.Tensor, win: int) -> torch.Tensor:
    """'valid' win x win uniform mean via cumulative sums (exact on integer images)."""
    for dim in (-1, -2):
        c = torch.cumsum(F.pad(x, (1, 0) if dim == -1 else (0, 0, 1, 0)), dim)
        x = c.narrow(dim, win, c.shape[dim] - win) - c.narrow(dim, 0, c.shape[dim] - win)
    return x / (win * win)


def _vif_terms(ref: torch.Tensor, dist: torch.Tensor, g: torch.Tensor,
               mu_d: torch.Tensor, dd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Numerator and denominator sums of one scale for reference ``ref`` (N, 1, H, W)."""
    stats = _filter_valid(torch.cat([ref, ref * ref, ref * dist], 1), g)
    mu1, s11, s12 = stats[:, 0:1], stats[:, 1:2], stats[:, 2:3]
    sigma1 = (s11 - mu1 * mu1).clamp_min(0)
    sigma2 = (dd - mu_d * mu_d).clamp_min(0)
    sigma12 = s12 - mu1 * mu_d
    gain = sigma12 / (sigma1 + EPS)
    sv = sigma2 - gain * sigma12
    flat1 = sigma1 < EPS
    gain = torch.where(flat1, 0.0, gain)
    sv = torch.where(flat1, sigma2, sv)
    sigma1 = torch.where(flat1, 0.0, sigma1)
    flat2 = sigma2 < EPS
    gain = torch.where(flat2, 0.0, gain)
    sv = torch.where(flat2, 0.0, sv)
    negative = gain < 0
    sv = torch.where(negative, sigma2, sv)
    gain = gain.clamp_min(0)
    sv = sv.clamp_min(EPS)
    num = torch.log10(1 + gain * gain * sigma1 / (sv + 2.0)).sum((1, 2, 3))
    den = torch.log10(1 + sigma1 / 2.0).sum((1, 2, 3))
    return num, den


def vif(f, a, b) -> torch.Tensor:
    """VIF(A, F) + VIF(B, F); F's local statistics are shared by both terms."""
    f, a, b = _batch(f), _batch(a), _batch(b)
    imgs = torch.stack([a, b, f], 1)  # (N, 3, H, W)
    totals = torch.zeros(2, 2, f.shape[0], dtype=DTYPE, device=f.device)
    for scale in range(1, 5):
        g = _gauss_1d(2 ** (5 - scale) + 1, f.device)
        if scale > 1:
            imgs = _filter_valid(imgs, g, step=2)
        if min(imgs.shape[2:]) < len(g):
            break  # tiny image: the coarser scales do not fit; use those that do
        fd = imgs[:, 2:3]
        mu_d, dd = _filter_valid(torch.cat([fd, fd * fd], 1), g).split(1, 1)
        for i in range(2):
            num, den = _vif_terms(imgs[:, i:i + 1], fd, g, mu_d, dd)
            totals[i, 0] += num
            totals[i, 1] += den
    num, den = totals[:, 0], totals[:, 1]
    ok = den != 0
    return torch.where(ok, num / _safe(den, ok), torch.ones_like(num)).sum(0)  # 0/0 counts 1


_SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=DTYPE)
_SOBEL_Y = torch.tensor([[1.0, 2.0, 1.0], [0.0, 0.0, 0.0], [-1.0, -2.0, -1.0]], dtype=DTYPE)


def _edges(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sobel strength and orientation in float32, as the evaluator computes them (its images
    are float32), with a true 'same' convolution and zero padding."""
    kernels = torch.stack([_SOBEL_X.flip(0, 1), _SOBEL_Y.flip(0, 1)]).unsqueeze(1).float()
    s = F.conv2d(x.unsqueeze(1).float(), kernels.to(x.device), padding=1)
    sx, sy = s[:, 0], s[:, 1]
    square = sx * sx + sy * sy
    strength = torch.where(square > 0, torch.sqrt(_safe(square, square > 0)), 0.0)
    safe = torch.where(sx == 0, torch.ones_like(sx), sx)
    angle = torch.where(sx == 0, torch.full_like(sx, math.pi / 2), torch.atan(sy / safe))
    return strength, angle


def _edge_preservation(g_s: torch.Tensor, a_s: torch.Tensor, g_f: torch.Tensor,
                       a_f: torch.Tensor) -> torch.Tensor:
    ratio = torch.where(g_s > g_f, g_f / torch.where(g_s > 0, g_s, 1.0),
                        torch.where(g_s == g_f, g_f, g_s / torch.where(g_f > 0, g_f, 1.0)))
    orient = 1 - torch.abs(a_s - a_f) / (math.pi / 2)
    q_g = 0.9994 / (1 + torch.exp(-15 * (ratio - 0.5)))
    q_a = 0.9879 / (1 + torch.exp(-22 * (orient - 0.8)))
    return q_g * q_a


def qabf(f, a, b) -> torch.Tensor:
    f, a, b = _batch(f), _batch(a), _batch(b)
    (g_a, a_a), (g_b, a_b), (g_f, a_f) = _edges(a), _edges(b), _edges(f)
    num = _flat(_edge_preservation(g_a, a_a, g_f, a_f) * g_a
                + _edge_preservation(g_b, a_b, g_f, a_f) * g_b).to(DTYPE).sum(1)
    den = _flat(g_a + g_b).to(DTYPE).sum(1)
    return torch.where(den > 0, num / den.clamp_min(1e-300), torch.zeros_like(num))


def _ssim(f: torch.Tensor, sources: list[torch.Tensor], data_range: float) -> torch.Tensor:
    """Sum over sources of SSIM(F, source); F's local statistics are computed once."""
    win = 7
    stats = _box_mean_valid(torch.stack([f, f * f, *sources, *(s * s for s in sources),
                                         *(f * s for s in sources)], 1), win)
    ux, uxx = stats[:, 0], stats[:, 1]
    n = len(sources)
    total = torch.zeros(f.shape[0], dtype=DTYPE, device=f.device)
    for i in range(n):
        uy, uyy, uxy = stats[:, 2 + i], stats[:, 2 + n + i], stats[:, 2 + 2 * n + i]
        total += _ssim_map(ux, uy, uxx, uyy, uxy, data_range, win)
    return total


def _ssim_map(ux, uy, uxx, uyy, uxy, data_range: float, win: int) -> torch.Tensor:
    cov_norm = win * win / (win * win - 1)
    vx = cov_norm * (uxx - ux * ux)
    vy = cov_norm * (uyy - uy * uy)
    vxy = cov_norm * (uxy - ux * uy)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return _flat(s).mean(1)


def ssim(f, a, b, options: MetricOptions = PUBLISHED) -> torch.Tensor:
    f, a, b = _batch(f), _batch(a), _batch(b)
    return _ssim(f, [a, b], options.ssim_data_range)


def compute(f, a, b, names: tuple[str, ...] = METRICS,
            options: MetricOptions = PUBLISHED) -> dict[str, torch.Tensor]:
    """The named metrics for a batch of (fused, A, B) images; each value has shape (N,)."""
    f, a, b = _batch(f), _batch(a), _batch(b)
    if not f.shape == a.shape == b.shape:
        raise ValueError(f"shape mismatch: F {tuple(f.shape)}, A {tuple(a.shape)}, "
                         f"B {tuple(b.shape)}")
    single = {"EN": en, "SD": sd, "SF": sf, "AG": ag}
    triple = {"SCD": scd, "VIF": vif, "Qabf": qabf, "CC": cc, "MSE": mse, "PSNR": psnr}
    with_options = {"MI": mi, "SSIM": ssim}
    out = {}
    for name in names:
        if name in single:
            out[name] = single[name](f)
        elif name in triple:
            out[name] = triple[name](f, a, b)
        elif name in with_options:
            out[name] = with_options[name](f, a, b, options)
        else:
            raise ValueError(f"unknown metric {name!r}; known: {', '.join(METRICS)}")
    return out
