"""Building blocks shared by the families: Restormer blocks with channel attention, a ViT
block, shifted-window (Swin) blocks, ResNet basic blocks, and the hook that makes global
statistics exact under tiled inference.

The ViT, Swin and ResNet blocks follow timm's definitions but are written here in plain
torch: importing timm pulls in torchvision and torch._dynamo, about 8 s of start-up on this
2-core machine (measured: `import torch` 3.8 s, `import torch, timm.layers` 11.7 s), which
alone would break the 5-second budget of `fusion fuse` on one pair.

Channel ("transposed") attention normalises and correlates queries and keys over *all*
pixels, so it is global. For tiled inference, ``fusion.inference.tiling`` installs a
:class:`GlobalAttention` through ``GLOBAL_ATTENTION`` (a context variable, so concurrent
threads never see each other's): the layers then ask it for the whole image's statistics
instead of computing them from their own tile.
"""

from __future__ import annotations

import math
from contextvars import ContextVar
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn


class GlobalAttention(Protocol):
    """What global layers need from exact tiled inference (``fusion.inference.tiling``)."""

    def channel_scores(self, layer: nn.Module, q: torch.Tensor, k: torch.Tensor
                       ) -> torch.Tensor: ...

    def positions(self, dim: int, grid: tuple[int, int], dtype: torch.dtype) -> torch.Tensor: ...

    def token_block(self, block: TokenBlock, tokens: torch.Tensor, grid: tuple[int, int]
                    ) -> torch.Tensor: ...


GLOBAL_ATTENTION: ContextVar[GlobalAttention | None] = ContextVar("fusion_global_attention",
                                                                  default=None)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of each pixel of an (N, C, H, W) map (as Restormer)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # reductions over dim 1, not permute + layer_norm: in onnxruntime the two transposes
        # and a layer norm over 24 values per pixel cost more than these passes; the norm
        # (one ReduceL2) gives the variance without a squared copy of the map
        centred = x - x.mean(1, keepdim=True)
        std = (centred.norm(dim=1, keepdim=True).square() / x.shape[1] + self.eps).sqrt()
        x = centred / std
        if self.weight is None:  # folded into the next convolutions (fold_norms)
            return x
        return x * self.weight[:, None, None] + self.bias[:, None, None]


def sincos_positions(grid: tuple[int, int], dim: int, dtype: torch.dtype = torch.float32,
                     device: torch.device | str | None = None) -> torch.Tensor:
    """2-D sin-cos position embedding of a (rows, columns) token grid: (rows*cols, dim),
    row-major; the y and x coordinates each get dim/4 sin and dim/4 cos bands."""
    bands = 1.0 / 10000.0 ** (torch.arange(dim // 4, device=device, dtype=torch.float32)
                              / (dim // 4))
    ys, xs = torch.meshgrid(torch.arange(grid[0], device=device, dtype=torch.float32),
                            torch.arange(grid[1], device=device, dtype=torch.float32),
                            indexing="ij")
    angles = torch.stack([ys.flatten(), xs.flatten()], 1)[..., None] * bands  # (T, 2, dim/4)
    return torch.stack([angles.sin(), angles.cos()], 1).flatten(1).to(dtype)


def mlp(dim: int, ratio: float) -> nn.Sequential:
    hidden = int(dim * ratio)
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


class TokenBlock(nn.Module):
    """Pre-norm ViT block over (N, T, D) tokens: multi-head self-attention, then an MLP.
    ``keys_values`` and ``attend`` split the attention so that exact tiling can gather the
    keys and values of every tile before any tile attends to them."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 2.0) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = mlp(dim, mlp_ratio)

    def _qkv(self, tokens: torch.Tensor) -> torch.Tensor:
        n, t, d = tokens.shape
        return self.qkv(self.norm1(tokens)).reshape(n, t, 3, self.heads, d // self.heads
                                                    ).permute(2, 0, 3, 1, 4)

    def keys_values(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, heads, T, head_dim) keys and values of these tokens."""
        _, k, v = self._qkv(tokens)
        return k, v

    def attend(self, tokens: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The block, with attention over the given keys and values."""
        q = self._qkv(tokens)[0]
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        tokens = tokens + self.proj(out)
        return tokens + self.mlp(self.norm2(tokens))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.attend(tokens, *self.keys_values(tokens))


class BasicBlock(nn.Module):
    """ResNet-18's basic block at full resolution: conv-BN-ReLU-conv-BN, plus the input."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(x + self.bn2(self.conv2(y)))


class WindowBlock(nn.Module):
    """Swin Transformer block on an (N, C, H, W) map: self-attention inside w x w windows
    with a learned relative position bias, windows shifted by ``shift`` (cyclically, the
    wrapped strips masked apart), then an MLP. H and W must be multiples of ``window``."""

    def __init__(self, dim: int, heads: int, window: int, shift: int,
                 mlp_ratio: float = 2.0) -> None:
        super().__init__()
        self.heads, self.window, self.shift = heads, window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = mlp(dim, mlp_ratio)
        self.bias = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        nn.init.trunc_normal_(self.bias, std=0.02)
        coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window),
                                            indexing="ij")).flatten(1)  # (2, w*w)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + window - 1
        self.register_buffer("bias_index", rel[..., 0] * (2 * window - 1) + rel[..., 1],
                             persistent=False)

    def _windows(self, x: torch.Tensor) -> torch.Tensor:
        """(N, H, W, C) -> (N * windows, w*w, C)."""
        n, h, w, c = x.shape
        s = self.window
        return x.reshape(n, h // s, s, w // s, s, c).transpose(2, 3).reshape(-1, s * s, c)

    def _mask(self, h: int, w: int, device: torch.device) -> torch.Tensor:
        """(windows, w*w, w*w): -inf between tokens that the cyclic shift brought together."""
        region = torch.zeros(1, h, w, 1, device=device)
        cuts = (slice(0, -self.window), slice(-self.window, -self.shift),
                slice(-self.shift, None))
        label = 0
        for ys in cuts:
            for xs in cuts:
                region[:, ys, xs] = label
                label += 1
        ids = self._windows(region)[..., 0]
        return torch.where(ids[:, :, None] == ids[:, None, :], 0.0, float("-inf"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        if h % self.window or w % self.window:
            raise ValueError(f"{h}x{w} is not a multiple of the window {self.window}")
        t = x.permute(0, 2, 3, 1)
        y = self.norm1(t)
        if self.shift:
            y = torch.roll(y, (-self.shift, -self.shift), (1, 2))
        win = self._windows(y)
        q, k, v = self.qkv(win).reshape(win.shape[0], -1, 3, self.heads, c // self.heads
                                        ).permute(2, 0, 3, 1, 4)
        bias = self.bias[self.bias_index].permute(2, 0, 1)  # (heads, w*w, w*w)
        if self.shift:
            count = win.shape[0] // n
            mask = self._mask(h, w, x.device)
            bias = (bias[None] + mask[:, None]).repeat(n, 1, 1, 1)
            bias = bias.reshape(n * count, self.heads, *bias.shape[-2:])
        # explicit attention over the window's w*w tokens (not SDPA: the ONNX exporter's
        # shape pass gives SDPA's output other strides than the trace and fails)
        attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1) + bias.to(q.dtype)
        out = self.proj((attn.softmax(-1) @ v).transpose(1, 2).flatten(2))
        s = self.window
        out = out.reshape(n, h // s, w // s, s, s, c).transpose(2, 3).reshape(n, h, w, c)
        if self.shift:
            out = torch.roll(out, (self.shift, self.shift), (1, 2))
        t = t + out
        t = t + self.mlp(self.norm2(t))
        return t.permute(0, 3, 1, 2)


def icnr_(conv: nn.Conv2d, scale: int) -> None:
    """ICNR init (Aitken et al. 2017): the s^2 sub-pixel outputs of a conv feeding a
    pixel-shuffle start with equal weights, i.e. as a nearest-neighbour upsampling, so the
    shuffle does not begin with (and need not unlearn) a checkerboard."""
    groups = scale ** 2
    if groups == 1:
        return
    with torch.no_grad():
        base = conv.weight[::groups].clone()
        conv.weight.copy_(base.repeat_interleave(groups, dim=0))
        if conv.bias is not None:
            conv.bias.copy_(conv.bias[::groups].repeat_interleave(groups))


def cosine(gram: torch.Tensor, q_norm: torch.Tensor, k_norm: torch.Tensor) -> torch.Tensor:
    """Cosine similarities from a Gram matrix and the row norms (each at least 1e-12, as
    F.normalize): normalising the C x C scores instead of the C x HW maps saves two
    full-size passes, and exact tiling sums the same three quantities over tiles."""
    return gram / (q_norm.clamp_min(1e-12)[..., :, None] * k_norm.clamp_min(1e-12)[..., None, :])


def halves(channels: int) -> tuple[slice, slice]:
    return slice(0, channels // 2), slice(channels // 2, channels)


def part_conv(conv: nn.Conv2d, x: torch.Tensor, part: slice) -> torch.Tensor:
    """``conv(x)[:, part]``, computing only those output channels; a depthwise conv takes
    only the part's input channels. Equal to slicing the output, but the exported graph
    then has two convolutions instead of a convolution and a Split, which onnxruntime
    copies in memory (measured: about 20% of a Restormer block)."""
    depthwise = conv.groups == conv.in_channels and conv.groups > 1
    bias = None if conv.bias is None else conv.bias[part]
    return F.conv2d(x, conv.weight[part], bias, conv.stride, conv.padding, conv.dilation,
                    part.stop - part.start if depthwise else 1)


class ChannelAttention(nn.Module):
    """Restormer's multi-Dconv head transposed attention; queries may come from another input.

    Attention is over channels (a C/h x C/h map per head), so cost is O(C^2 HW). ``dense``
    makes the 3x3 projection a full convolution instead of a depthwise one (a base
    encoder's); ``bias`` adds biases to the projections.
    """

    def __init__(self, dim: int, heads: int, dense: bool = False, bias: bool = False) -> None:
        super().__init__()
        self.heads = heads
        self.temperature = nn.Parameter(torch.ones(heads, 1, 1))

        def spatial(channels: int) -> nn.Conv2d:
            return nn.Conv2d(channels, channels, 3, padding=1, bias=bias,
                             groups=1 if dense else channels)
        self.q = nn.Sequential(nn.Conv2d(dim, dim, 1, bias=bias), spatial(dim))
        self.kv = nn.Sequential(nn.Conv2d(dim, 2 * dim, 1, bias=bias), spatial(2 * dim))
        self.proj = nn.Conv2d(dim, dim, 1, bias=bias)

    def _keys_values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.kv[1].groups == 1:  # dense: the spatial conv mixes the k and v channels
            return self.kv(x).chunk(2, 1)
        return tuple(part_conv(self.kv[1], part_conv(self.kv[0], x, part), part)
                     for part in halves(self.kv[0].out_channels))

    def forward(self, x_q: torch.Tensor, x_kv: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x_q.shape
        q = self.q(x_q).reshape(n, self.heads, c // self.heads, h, w)
        k, v = self._keys_values(x_kv)
        k = k.reshape(n, self.heads, c // self.heads, h, w)
        tiles = GLOBAL_ATTENTION.get()
        if tiles is None:
            qf, kf = q.flatten(3), k.flatten(3)
            scores = cosine(qf @ kf.transpose(-2, -1), qf.norm(dim=-1), kf.norm(dim=-1))
        else:
            scores = tiles.channel_scores(self, q, k)
        attn = (scores * self.temperature).softmax(dim=-1)
        # proj(attn v) as one C x C matrix applied to v: (W_proj blockdiag(attn)) v, a single
        # full-size product where attention then projection took two
        w_proj = self.proj.weight.reshape(c, self.heads, c // self.heads)
        mix = torch.einsum("ohi,nhij->nohj", w_proj, attn).reshape(n, c, c)
        out = mix @ v.flatten(2)
        if self.proj.bias is not None:
            out = out + self.proj.bias[:, None]
        return out.reshape(n, c, h, w)


class GatedFeedForward(nn.Module):
    """Restormer's gated-Dconv feed-forward network (``groups`` < hidden*2: grouped, not
    depthwise, 3x3 conv, as in a base encoder)."""

    def __init__(self, dim: int, factor: float, groups: int | None = None,
                 bias: bool = False) -> None:
        super().__init__()
        hidden = int(dim * factor)
        self.inp = nn.Conv2d(dim, 2 * hidden, 1, bias=bias)
        self.dw = nn.Conv2d(2 * hidden, 2 * hidden, 3, padding=1, bias=bias,
                            groups=groups or 2 * hidden)
        self.out = nn.Conv2d(hidden, dim, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dw.groups == self.dw.in_channels:
            a, b = (part_conv(self.dw, part_conv(self.inp, x, part), part)
                    for part in halves(self.inp.out_channels))
        else:  # grouped: a group may straddle the two halves
            a, b = self.dw(self.inp(x)).chunk(2, dim=1)
        return self.out(F.gelu(a) * b)


class RestormerBlock(nn.Module):
    """Pre-norm block: x + attention(LN x), then x + FFN(LN x). With ``cross`` the attention
    takes its keys and values from a second input (cross-modality attention)."""

    def __init__(self, dim: int, heads: int, ffn_factor: float, cross: bool = False,
                 dense: bool = False, ffn_groups: int | None = None, bias: bool = False) -> None:
        super().__init__()
        self.norm_q = LayerNorm2d(dim)
        self.norm_kv = LayerNorm2d(dim) if cross else None
        self.attn = ChannelAttention(dim, heads, dense=dense, bias=bias)
        self.norm_ffn = LayerNorm2d(dim) if ffn_factor > 0 else None
        self.ffn = GatedFeedForward(dim, ffn_factor, ffn_groups, bias) if ffn_factor > 0 else None

    def fold_norms(self) -> None:
        """See ``fold_norms``: each norm's affine into the 1x1 convolutions it feeds."""
        feeds = [(self.norm_q, [self.attn.q[0]] + ([self.attn.kv[0]] if self.norm_kv is None
                                                   else [])),
                 (self.norm_kv, [self.attn.kv[0]]),
                 (self.norm_ffn, [self.ffn.inp] if self.ffn is not None else [])]
        with torch.no_grad():
            for norm, convs in feeds:
                if norm is None or norm.weight is None:
                    continue
                for conv in convs:
                    assert conv.kernel_size == (1, 1)  # a wider zero-padded conv would not fold
                    w = conv.weight
                    shift = w[:, :, 0, 0] @ norm.bias
                    conv.bias = nn.Parameter(shift if conv.bias is None else conv.bias + shift)
                    conv.weight = nn.Parameter(w * norm.weight[None, :, None, None])
                norm.weight = norm.bias = None

    def forward(self, x: torch.Tensor, other: torch.Tensor | None = None) -> torch.Tensor:
        q = self.norm_q(x)
        x = x + self.attn(q, q if self.norm_kv is None else self.norm_kv(other))
        return x if self.ffn is None else x + self.ffn(self.norm_ffn(x))


def fold_norms(model: nn.Module) -> nn.Module:
    """The inference form of ``model``, in place: every LayerNorm2d's scale and shift moved
    into the 1x1 convolutions it feeds (W' = W diag(g), b' = b + W beta), which saves two
    full-size passes per norm. Outputs are equal up to float rounding; not for training."""
    for block in model.modules():
        if isinstance(block, RestormerBlock):
            block.fold_norms()
    return model


def shuffled_conv(conv: nn.Conv2d, x: torch.Tensor, scale: int) -> torch.Tensor:
    """``conv(F.pixel_shuffle(x, scale))`` for a 3x3 stride-1 ``conv`` with zero padding 1,
    computed before the shuffle: each full-resolution output phase is a 3x3 conv of the
    low-resolution map, so the full-resolution map of many channels is never made (it cost
    a third of the decoder's tail in onnxruntime). Exact up to float rounding."""
    if scale == 1:
        return conv(x)
    phase, tap = torch.meshgrid(torch.arange(scale, device=x.device),
                                torch.arange(3, device=x.device), indexing="ij")
    r = phase + tap - 1  # the full-resolution offset each tap reads
    # place[d, p, o, t] = 1: tap t of output phase d reads input phase p at offset o - 1
    place = torch.zeros(scale, scale, 3, 3, dtype=conv.weight.dtype, device=x.device)
    place[phase, torch.remainder(r, scale), torch.div(r, scale, rounding_mode="floor") + 1,
          tap] = 1
    o, c = conv.weight.shape[:2]
    weight = torch.einsum("ocyx,dpYy,eqXx->odecpqYX", conv.weight, place, place).reshape(
        o * scale ** 2, c * scale ** 2, 3, 3)
    bias = None if conv.bias is None else conv.bias.repeat_interleave(scale ** 2)
    return F.pixel_shuffle(F.conv2d(x, weight, bias, padding=1), scale)


def pad_to(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Pad (N, C, H, W) at the bottom/right to a multiple of ``multiple`` (reflect where the
    image is large enough, else replicate); returns the original (H, W) for cropping."""
    h, w = x.shape[-2:]
    ph, pw = -h % multiple, -w % multiple
    if ph or pw:
        mode = "reflect" if ph < h and pw < w else "replicate"
        x = F.pad(x, (0, pw, 0, ph), mode=mode)
    return x, (h, w)


def low_pass(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur with reflect borders (``sigma`` 0 returns ``x``); plain torch so
    that inference does not import kornia, and exportable to ONNX."""
    if sigma <= 0:
        return x
    r, c = math.ceil(3 * sigma), int(x.shape[1])  # (a fixed channel count: the kernel's
    # shape stays known to the ONNX exporter)
    t = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-(t / sigma) ** 2 / 2)
    k = (k / k.sum()).repeat(c, 1, 1, 1)
    x = F.pad(x, (r, r, r, r), mode="reflect")
    x = F.conv2d(x, k.view(-1, 1, 1, 2 * r + 1), groups=c)
    return F.conv2d(x, k.view(-1, 1, 2 * r + 1, 1), groups=c)


def two_scale(a: torch.Tensor, b: torch.Tensor, sigma: float, ceiling: float,
              weight: torch.Tensor | None = None, gain_a: torch.Tensor | float = 1.0,
              gain_b: torch.Tensor | float = 1.0,
              bases: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Two-scale fusion of same-size sources in [0, 1]: each splits into a Gaussian base
    (``sigma``) and its detail, ``F = w * base_a + (1 - w) * base_b + gain_a * detail_a +
    gain_b * detail_b``, at most ``(1 + ceiling) * max(a, b)`` (no bright halo beside an
    edge; dark stays dark) and within [0, 1].

    With the defaults (``w`` 1 where A's base is the brighter, gains 1) it is the training-free
    rule every learned model is measured against (evaluation's ``two-scale`` baseline); the
    families' heads predict ``w`` and the gains per pixel (``bases``: the two bases, when
    the caller has them already)."""
    base_a, base_b = bases or low_pass(torch.cat([a, b], 1), sigma).chunk(2, 1)
    if weight is None:
        weight = (base_a >= base_b).to(a.dtype)
    fused = (weight * base_a + (1 - weight) * base_b + gain_a * (a - base_a)
             + gain_b * (b - base_b))
    return torch.minimum(fused, (1 + ceiling) * torch.maximum(a, b)).clamp(0, 1)


SHARPNESS = 50.0  # the learned base weight's prior: sigmoid(50 x base difference)
SIGNAL = 0.05  # where both bases are darker than this, the head fades out: the rule stays


def binomial(x: torch.Tensor) -> torch.Tensor:
    """The 3x3 binomial filter ([1, 2, 1] / 4 each way, replicated borders), as two 2x2
    box filters: it removes the 2x2 alternating component exactly. A head on a
    pixel-unshuffled grid predicts each pixel of a 2x2 cell from another phase of its
    weights, and an unfiltered map left a 2x2 pattern in flat bright regions (TNO's
    saturated sky) and a line along the border."""
    x = F.pad(x, (1, 1, 1, 1), mode="replicate")
    return F.avg_pool2d(F.avg_pool2d(x, 2, stride=1), 2, stride=1)


def learned_two_scale(logits: torch.Tensor, a: torch.Tensor, b: torch.Tensor, sigma: float,
                      ceiling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``two_scale`` with weights a network predicts per pixel, as three logit maps
    (N, 3, H, W): the base weight of A is a sharp sigmoid of the base difference (the
    brighter base wins) shifted by the first, and each detail gain is the exponential of
    another. Zero logits are the training-free rule, so training starts from it and has
    to improve on it. The head's say fades to nothing where both bases are dark (below
    ``SIGNAL``): dark background (MRI's, the night sky's) stays as the rule has it, where
    no training patch taught the head anything. Returns (fused, base weight of A)."""
    bases = low_pass(torch.cat([a, b], 1), sigma).chunk(2, 1)
    say = (torch.maximum(*bases) / SIGNAL).clamp(max=1.0)
    shift, log_ga, log_gb = (say * x for x in binomial(logits).chunk(3, 1))
    weight = torch.sigmoid(SHARPNESS * (bases[0] - bases[1]) + shift)
    return (two_scale(a, b, sigma, ceiling, weight, log_ga.exp(), log_gb.exp(), bases),
            weight)


def zero_conv(channels: int, out: int) -> nn.Conv2d:
    """A 3x3 convolution that starts at zero (a head whose zero output means "the rule")."""
    conv = nn.Conv2d(channels, out, 3, padding=1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv
