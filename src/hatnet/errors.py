"""Errors raised for bad user input.

Every check at a public boundary raises one of these with a message that names the problem, so the CLI
can print a single line instead of a traceback from deep inside torch.
"""


class HatNetError(ValueError):
    """Base class for errors caused by user input (files, tensors, options)."""


class CheckpointError(HatNetError):
    """A checkpoint file is missing, corrupt, not a checkpoint, or does not fit the model."""


class InputError(HatNetError):
    """An input tensor or image has the wrong rank, channel count or size."""


class DatasetError(HatNetError):
    """A dataset folder or annotation file is missing, empty or inconsistent."""


class OutputError(HatNetError):
    """An output cannot be written: a full disk, a read-only or forbidden folder, a file that exists already."""
