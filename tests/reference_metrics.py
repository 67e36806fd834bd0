"""Independent NumPy/SciPy computations of the metric definitions, for agreement tests.

Written straight from the definitions in fusion/metrics.py's docstring (loops and scipy's
convolve2d, float64), deliberately sharing no code with the torch implementation.
"""

import math

import numpy as np
from scipy.signal import convolve2d
from skimage.metrics import structural_similarity
from sklearn.metrics import mutual_info_score


def en(f):
    levels = np.uint8(np.round(np.clip(f, 0, 255))).ravel()
    p = np.bincount(levels, minlength=256) / levels.size
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


def sf(f):
    return float(np.sqrt(np.mean(np.diff(f, axis=1) ** 2) + np.mean(np.diff(f, axis=0) ** 2)))


def mi(f, a, b):
    return mutual_info_score(f.ravel(), a.ravel()) + mutual_info_score(f.ravel(), b.ravel())


def _corr(x, y):
    return float(np.corrcoef(x.ravel(), y.ravel())[0, 1])


def scd(f, a, b):
    return _corr(a, f - b) + _corr(b, f - a)


def _matlab_gaussian(n):
    sd = n / 5.0
    r = (n - 1) / 2.0
    y, x = np.mgrid[-r:r + 1, -r:r + 1]
    h = np.exp(-(x * x + y * y) / (2 * sd * sd))
    h[h < np.finfo(float).eps * h.max()] = 0
    return h / h.sum()


def _vif_pair(ref, dist):
    num = den = 0.0
    for scale in range(1, 5):
        win = _matlab_gaussian(2 ** (5 - scale) + 1)
        if scale > 1:
            ref = convolve2d(ref, win, mode="valid")[::2, ::2]
            dist = convolve2d(dist, win, mode="valid")[::2, ::2]
        mu1, mu2 = convolve2d(ref, win, mode="valid"), convolve2d(dist, win, mode="valid")
        s1 = np.maximum(convolve2d(ref * ref, win, mode="valid") - mu1 ** 2, 0)
        s2 = np.maximum(convolve2d(dist * dist, win, mode="valid") - mu2 ** 2, 0)
        s12 = convolve2d(ref * dist, win, mode="valid") - mu1 * mu2
        g = s12 / (s1 + 1e-10)
        sv = s2 - g * s12
        m = s1 < 1e-10
        g[m], sv[m], s1[m] = 0, s2[m], 0
        m = s2 < 1e-10
        g[m], sv[m] = 0, 0
        m = g < 0
        sv[m], g[m] = s2[m], 0
        sv[sv <= 1e-10] = 1e-10
        num += np.sum(np.log10(1 + g * g * s1 / (sv + 2)))
        den += np.sum(np.log10(1 + s1 / 2))
    value = num / den
    return 1.0 if np.isnan(value) else float(value)


def vif(f, a, b):
    return _vif_pair(a, f) + _vif_pair(b, f)


def _sobel(img):
    sx = convolve2d(img, np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], float), mode="same")
    sy = convolve2d(img, np.array([[1, 2, 1], [0, 0, 0], [-1, -2, -1]], float), mode="same")
    g = np.hypot(sx, sy)
    angle = np.full_like(img, math.pi / 2)
    nz = sx != 0
    angle[nz] = np.arctan(sy[nz] / sx[nz])
    return g, angle


def _q(g_s, a_s, g_f, a_f):
    ratio = np.empty_like(g_s)
    gt, eq, lt = g_s > g_f, g_s == g_f, g_s < g_f
    ratio[gt] = g_f[gt] / g_s[gt]
    ratio[eq] = g_f[eq]
    ratio[lt] = g_s[lt] / g_f[lt]
    orient = 1 - np.abs(a_s - a_f) / (math.pi / 2)
    return (0.9994 / (1 + np.exp(-15 * (ratio - 0.5)))) * (
        0.9879 / (1 + np.exp(-22 * (orient - 0.8))))


def qabf(f, a, b):
    (ga, aa), (gb, ab), (gf, af) = _sobel(a), _sobel(b), _sobel(f)
    return float(np.sum(_q(ga, aa, gf, af) * ga + _q(gb, ab, gf, af) * gb) / np.sum(ga + gb))


def ssim(f, a, b, data_range=2.0):
    return sum(structural_similarity(f, x, data_range=data_range, win_size=7,
                                     use_sample_covariance=True) for x in (a, b))


def all_eight(f, a, b):
    return {"EN": en(f), "SD": float(np.std(f)), "SF": sf(f), "MI": mi(f, a, b),
            "SCD": scd(f, a, b), "VIF": vif(f, a, b), "Qabf": qabf(f, a, b),
            "SSIM": ssim(f, a, b)}
