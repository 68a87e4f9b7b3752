"""How the command-line tools (`train`, `evaluate`, `predict`) run under several processes: one place, imported by
all three, so that none of them imports another for it."""

from __future__ import annotations

import os

import torch


def launched_on_cpu_only() -> bool:
    """Several processes launched (torchrun, `accelerate launch --multi_gpu`) on a machine with no accelerator:
    Accelerate runs several CPU processes (gloo) only when told to use the CPU; otherwise each process would run
    alone, on all the data, into the same output folder."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.accelerator.is_available()
