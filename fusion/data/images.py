"""Reading and writing images, and the colour handling shared by prepare, fuse and score.

Images keep their bit depth (8 or 16 bit) as ``uint8``/``uint16`` arrays; RGB sources are
reduced to luma Y (BT.601 YCbCr) where a single channel is needed. Every read checks the
header first: an image over ``max_pixels`` is refused before a byte of it is decoded.
This module imports no torch, so input checks answer fast.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from fusion.errors import BadInputError, FusionError
from fusion.files import write_error

SUPPORTED_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
DEFAULT_MAX_PIXELS = 50_000_000  # data.max_pixels: 49 MP fuses in under 2 min on 2 cores
# what each output format can hold: (bit depths, colour)
OUTPUT_FORMATS = {".png": (8, 16), ".tif": (8, 16), ".tiff": (8, 16), ".jpg": (8,),
                  ".jpeg": (8,), ".bmp": (8,)}


@dataclass(frozen=True)
class ImageInfo:
    """What the header says, before decoding."""

    path: Path | Upload
    width: int
    height: int
    channels: int  # 1 grey, 3 colour
    bits: int  # 8 or 16


@dataclass(frozen=True)
class SourceImage:
    """Decoded pixels: ``(H, W)`` grey or ``(H, W, 3)`` RGB, ``uint8`` or ``uint16``."""

    pixels: np.ndarray

    @property
    def bits(self) -> int:
        return 16 if self.pixels.dtype == np.uint16 else 8

    @property
    def channels(self) -> int:
        return 1 if self.pixels.ndim == 2 else self.pixels.shape[2]

    @property
    def height(self) -> int:
        return self.pixels.shape[0]

    @property
    def width(self) -> int:
        return self.pixels.shape[1]

    @property
    def is_colour(self) -> bool:
        """Truly RGB: its channels differ (an RGB file of grey content is grey)."""
        p = self.pixels
        return self.channels == 3 and not (np.array_equal(p[..., 0], p[..., 1])
                                           and np.array_equal(p[..., 1], p[..., 2]))


def _mode_info(mode: str) -> tuple[int, int]:
    """(channels, bits) that ``_pixels`` makes of a Pillow mode."""
    if mode.startswith("I;16") or mode == "I":
        return 1, 16
    if mode in ("1", "L", "LA"):
        return 1, 8
    if mode in ("RGB", "P", "PA", "RGBA", "CMYK", "YCbCr", "LAB", "HSV"):
        return 3, 8
    raise FusionError(f"unsupported pixel format {mode!r}")


def _pixels(im: Image.Image) -> np.ndarray:
    mode = im.mode
    if mode in ("L", "RGB"):
        return np.asarray(im)
    if mode.startswith("I;16"):
        return np.asarray(im).astype(np.uint16)
    if mode == "I":  # 16-bit greys decoded as int32 by some Pillow codecs
        arr = np.asarray(im)
        if arr.min() < 0 or arr.max() > 65535:
            raise FusionError("32-bit integer pixels are not supported (only 8 and 16 bit)")
        return arr.astype(np.uint16)
    if mode in ("1", "LA"):
        return np.asarray(im.convert("L"))
    _mode_info(mode)
    return np.asarray(im.convert("RGB"))


@dataclass(frozen=True)
class Upload:
    """An image that arrived as bytes (an HTTP upload), named for error messages; read like
    a file, its format decided by its content (one of ``formats``), not by its name."""

    name: str
    data: bytes = field(repr=False)
    formats: tuple[str, ...] = ("PNG", "TIFF")  # what the serving endpoint takes

    def __fspath__(self) -> str:  # errors name it like a file
        return self.name

    __str__ = __fspath__

    def suffix(self) -> str:
        """The file suffix of its format, from its content (after ``probe_image``)."""
        with Image.open(io.BytesIO(self.data)) as im:
            return FORMATS[im.format]


# Pillow's format names of what files may hold (SUPPORTED_SUFFIXES), and their suffix
FORMATS = {"PNG": ".png", "JPEG": ".jpg", "BMP": ".bmp", "TIFF": ".tif", "MPO": ".jpg"}


def _open(path: Path | Upload) -> Image.Image:
    if isinstance(path, Upload):
        return _open_upload(path)
    if path.suffix.lower() not in SUPPORTED_SUFFIXES:
        raise BadInputError(path, f"unsupported format {path.suffix or '(no suffix)'!r}")
    try:
        if path.stat().st_size == 0:
            raise BadInputError(path, "empty file")
        with warnings.catch_warnings():  # our own limit (data.max_pixels) is checked next
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(path)
    except BadInputError:
        raise
    except FileNotFoundError as exc:
        raise BadInputError(path, "file not found") from exc
    except IsADirectoryError as exc:
        raise BadInputError(path, "is a folder, not an image") from exc
    except (OSError, ValueError, SyntaxError, UnidentifiedImageError,
            Image.DecompressionBombError) as exc:
        raise BadInputError(path, f"cannot decode image ({exc})") from exc


def _open_upload(upload: Upload) -> Image.Image:
    if not upload.data:
        raise BadInputError(upload, "empty upload")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(upload.data))
    except UnidentifiedImageError as exc:
        raise BadInputError(upload, "cannot decode image (not an image file)") from exc
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise BadInputError(upload, f"cannot decode image ({exc})") from exc
    if im.format not in upload.formats:
        raise BadInputError(upload, f"unsupported format {im.format!r}; send "
                                    f"{' or '.join(upload.formats)}")
    return im


class TooLargeError(BadInputError):
    """An image over ``data.max_pixels``, known from its header before a byte is decoded."""


def _check_size(path: Path | Upload, width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise TooLargeError(path, f"{width}x{height} is {width * height / 1e6:.0f} MP, over the "
                                  f"limit of {max_pixels / 1e6:.0f} MP (data.max_pixels)")


def probe_image(path: str | Path | Upload, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageInfo:
    """Size, channels and bit depth from the header alone (nothing is decoded)."""
    path = path if isinstance(path, Upload) else Path(path)
    with _open(path) as im:
        try:
            channels, bits = _mode_info(im.mode)
        except FusionError as exc:
            raise BadInputError(path, str(exc)) from exc
        _check_size(path, im.width, im.height, max_pixels)
        return ImageInfo(path, im.width, im.height, channels, bits)


def read_image(path: str | Path | Upload, max_pixels: int = DEFAULT_MAX_PIXELS) -> SourceImage:
    """Decode ``path`` fully, or raise :class:`BadInputError` naming the file and the reason."""
    path = path if isinstance(path, Upload) else Path(path)
    im = _open(path)
    try:
        with im:
            _check_size(path, im.width, im.height, max_pixels)
            im.load()
            pixels = _pixels(im)
    except BadInputError:
        raise
    except FusionError as exc:
        raise BadInputError(path, str(exc)) from exc
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise BadInputError(path, f"cannot decode image ({exc})") from exc
    if pixels.size == 0:
        raise BadInputError(path, "image has no pixels")
    return SourceImage(np.ascontiguousarray(pixels))


def size_mismatch(a_file: Path | Upload, a_size: tuple[int, int], b_file: Path | Upload,
                  b_size: tuple[int, int]) -> BadInputError:
    """The error for two sources of different sizes, naming both sides (on B's file)."""
    def side(path: Path | Upload, size: tuple[int, int]) -> str:
        name = path.name if isinstance(path, Upload) else f"{path.parent.name}/{path.name}"
        return f"{name} is {size[0]}x{size[1]}"
    return BadInputError(b_file, f"size mismatch: {side(a_file, a_size)}, "
                                 f"{side(b_file, b_size)}")


def max_value(bits: int) -> float:
    return 65535.0 if bits == 16 else 255.0


def to_unit(pixels: np.ndarray) -> np.ndarray:
    """``uint8``/``uint16`` pixels -> float32 in [0, 1]."""
    return pixels.astype(np.float32) / np.float32(max_value(16 if pixels.dtype == np.uint16
                                                            else 8))


def rgb_to_ycbcr(rgb: np.ndarray) -> np.ndarray:
    """(..., H, W, 3) RGB in [0, 1] -> YCbCr, BT.601 full range (chroma centred on 0.5)."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    y = 0.299 * r + 0.587 * g + 0.114 * b
    return np.stack([y, (b - y) * 0.564 + 0.5, (r - y) * 0.713 + 0.5], -1)


def ycbcr_to_rgb(ycbcr: np.ndarray) -> np.ndarray:
    y, cb, cr = ycbcr[..., 0], ycbcr[..., 1] - 0.5, ycbcr[..., 2] - 0.5
    rgb = np.stack([y + 1.403 * cr, y - 0.714 * cr - 0.344 * cb, y + 1.773 * cb], -1)
    return np.clip(rgb, 0.0, 1.0)


def luma(image: SourceImage) -> np.ndarray:
    """Single-channel pixels at the image's own bit depth: grey as is, RGB -> Y."""
    if image.channels == 1:
        return image.pixels
    scale = max_value(image.bits)
    y = rgb_to_ycbcr(to_unit(image.pixels))[..., 0]
    return np.clip(np.round(y * scale), 0, scale).astype(image.pixels.dtype)


def output_format(path: str | Path, bits: int, colour: bool) -> str:
    """Check, before any work, that ``path``'s format can hold the result; returns the
    suffix. 16-bit results need PNG or TIFF (colour too: 16-bit RGB PNG/TIFF)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in OUTPUT_FORMATS:
        raise BadInputError(path, f"unsupported output format {suffix or '(no suffix)'!r}; "
                                  f"use one of {', '.join(sorted(OUTPUT_FORMATS))}")
    if bits not in OUTPUT_FORMATS[suffix]:
        kind = "colour" if colour else "grey"
        raise BadInputError(path, f"the result is 16-bit {kind}, which {suffix} cannot hold; "
                                  "write .png or .tif")
    return suffix


def encode_image(pixels: np.ndarray, suffix: str) -> bytes:
    """Grey or RGB, 8 or 16 bit, as the bytes of an image file of format ``suffix``.

    Pillow encodes everything but 16-bit colour, which OpenCV encodes (PNG or TIFF)."""
    if pixels.ndim == 3 and pixels.dtype == np.uint16:
        import cv2

        done, data = cv2.imencode(suffix, np.ascontiguousarray(pixels[..., ::-1]))
        if not done:
            raise OSError(f"OpenCV could not encode {suffix}")
        return data.tobytes()
    buffer = io.BytesIO()
    image = Image.fromarray(pixels)
    kind = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".tif": "TIFF", ".tiff": "TIFF",
            ".bmp": "BMP"}[suffix]
    image.save(buffer, kind, **({"quality": 95} if kind == "JPEG" else {}))
    return buffer.getvalue()


def write_image(pixels: np.ndarray, path: str | Path) -> Path:
    """Write grey or RGB, 8 or 16 bit, in the format the suffix names (atomically)."""
    path = Path(path)
    suffix = output_format(path, 16 if pixels.dtype == np.uint16 else 8, pixels.ndim == 3)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{suffix}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(encode_image(pixels, suffix))
        tmp.replace(path)
    except OSError as exc:
        raise write_error(path, exc) from exc
    finally:
        tmp.unlink(missing_ok=True)
    return path
