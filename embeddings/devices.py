"""Device choice shared by the embedding jobs."""

from __future__ import annotations

from featurestore.errors import DeviceError


def resolve_device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(f"device '{requested}' requested but torch sees no CUDA GPU; use 'auto' or 'cpu'")
    return requested
