"""The torch device a setting names, for training and inference alike."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

PRECISIONS = ("auto", "fp32", "bf16")  # torch inference; auto: bf16 in windows where native


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA when a GPU is visible, else the CPU; any other name as torch reads it
    (torch is imported here, on first use, so checking inputs stays fast)."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def native_bf16(device: torch.device) -> bool:
    """Whether bfloat16 runs natively here: on the CPU, oneDNN's own check (AVX512-BF16 or
    AMX; without them bf16 is emulated and slower than fp32), on CUDA the GPU's."""
    import torch

    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported()
