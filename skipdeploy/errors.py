"""One exception family: every error a user can cause is a SkipDeployError."""


class SkipDeployError(Exception):
    """Base class; the message says what was wrong and what to do about it."""


class ScheduleError(SkipDeployError, ValueError):
    """A schedule parameter is out of bounds, or a per-step table is not monotone."""


class ManifestError(SkipDeployError):
    """An export directory is missing, incomplete, corrupted or of an unknown format."""


class CheckpointError(SkipDeployError):
    """A model checkpoint cannot be read or is not of a supported family."""


class ExportError(SkipDeployError):
    """An exported graph failed its check against PyTorch, or the export could not be written."""


class CapacityError(SkipDeployError):
    """A request does not fit: batch, length, positions, or memory for the KV cache."""


class InputError(SkipDeployError, ValueError):
    """Bad generation input: empty prompt, token id out of range, ..."""


class BackendError(SkipDeployError):
    """A backend is unavailable (library not installed, no GPU) or failed at run time."""


class NumericalError(SkipDeployError):
    """Non-finite values appeared during decoding; the message names the step and the first layer."""
