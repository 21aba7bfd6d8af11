"""Errors a user can cause. The CLI prints their message as one line and exits non-zero."""


class T2IAdapterError(Exception):
    """Base class: a problem with the user's input, files or options, with what to do about it."""


class CheckpointError(T2IAdapterError):
    """A checkpoint file or folder cannot be read as an adapter."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle checkpoint needs arbitrary code to unpickle; it was refused and nothing in it ran."""


class ConditionError(T2IAdapterError):
    """A condition image does not fit the adapter it is given to."""


class ConfigError(T2IAdapterError):
    """Options or a configuration that cannot work together."""


class MissingWeightsError(T2IAdapterError):
    """Model weights are needed but are not available offline."""


def out_of_memory(exc: BaseException) -> str | None:
    """Which memory an exception says ran out ("GPU" or "CPU"), or None for any other failure."""
    if type(exc).__name__ == "OutOfMemoryError" or "CUDA out of memory" in str(exc):
        return "GPU"
    if isinstance(exc, MemoryError) or "can't allocate memory" in str(exc):  # torch's CPU allocator says this
        return "CPU"
    return None
