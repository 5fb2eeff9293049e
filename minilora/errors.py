"""One exception type per kind of problem. Every message names the file, key, field or row at fault.

All derive from `MiniLoraError`, so a script can catch them together and the CLI can print them
as one line instead of a traceback from deep inside torch.
"""


class MiniLoraError(Exception):
    """Base class of every error minilora raises on purpose."""


class ConfigError(MiniLoraError, ValueError):
    """A bad config value: a missing field in config.json, r <= 0, a LoRA target that matches nothing."""


class CheckpointError(MiniLoraError):
    """A checkpoint that is missing, corrupt, or does not match the model it is loaded into."""


class DataError(MiniLoraError, ValueError):
    """A dataset that cannot be used: a missing file, a malformed row, a sequence too long."""


class TrainingError(MiniLoraError):
    """Training cannot go on: a non-finite loss, for instance. The message names the step."""


class WriteError(CheckpointError):
    """An output that cannot be written now: the disk is full, the folder read-only or not permitted, or
    another process is writing the same file. The message names the file and the cause; a version
    already there is kept as it was."""
