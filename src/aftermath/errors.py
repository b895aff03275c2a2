"""One exception family. Every message says what was wrong, with the offending value, and how to fix it."""


class AftermathError(Exception):
    """Base of every error Aftermath raises on purpose."""


class ConfigError(AftermathError):
    """A configuration value (model, tier, run) is invalid."""


class TierError(ConfigError):
    """A tier or Mix'n'Match spec cannot exist for this model."""


class CheckpointError(AftermathError):
    """A checkpoint, manifest or tier directory is missing, corrupt or incompatible."""


class PayloadError(AftermathError):
    """An update payload is malformed or does not match the run."""


class DataError(AftermathError):
    """Training data is missing, malformed or incompatible with the model."""


class DataParallelError(AftermathError):
    """A process of a data-parallel client (`client --nproc N`) failed or could not start."""


class ExcludedError(AftermathError):
    """The coordinator excluded this client from the run (its results were flagged by the screen)."""


EXIT_EXCLUDED = 3  # the exit status of a client the coordinator excluded (other errors exit 2)
