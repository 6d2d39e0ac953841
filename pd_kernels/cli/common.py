"""What the commands share: the two kinds of user-facing error, and the device choice."""
from __future__ import annotations


class CLIError(Exception):
    """A user-facing error: printed as one line (``pd-kernels: error: ...``), exit status 1."""


class UsageError(Exception):
    """A bad option value found after parsing (e.g. by :class:`~pd_kernels.DecodeConfig`'s validation):
    reported as argparse reports its own (usage, ``error: argument OPTION: ...``), exit status 2."""

    def __init__(self, option: str, message: str):
        super().__init__(f"argument {option}: {message}")
        self.option = option


def resolve_device(choice: str | None) -> str:
    """``--device``: the choice, checked (``"cuda"`` needs a CUDA device), or cuda when there is one, else cpu."""
    import torch

    if choice == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda: no CUDA device is available to torch")
    return choice or ("cuda" if torch.cuda.is_available() else "cpu")
