"""Where a job runs and with how many threads: the one device resolver and the one thread count, shared by the
embedding jobs, the learners (the fine-tuned regressor) and the stack. torch is imported only when asked."""

from __future__ import annotations

import os

from featurestore.config import Config
from featurestore.errors import DeviceError


def resolve_device(requested: str, setting: str = "device") -> str:
    """"auto" = CUDA when torch sees a GPU, else CPU; an explicit "cuda..." without a GPU is refused, naming the
    setting that asked for it."""
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(f"{setting} = {requested!r} but torch sees no CUDA GPU; use 'auto' or 'cpu'")
    return requested


def threads(config: Config) -> int:
    """Threads each library gets in this process: models.threads, 0 = every core."""
    return config.models.threads or os.cpu_count() or 1
