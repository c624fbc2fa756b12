"""Errors a user can act on.

Every error raised for bad input (a wrong path, a malformed dataset, an unknown config key, a corrupt
checkpoint) is one of these. The message names the file or key, what was expected, and how to fix it.
The CLI prints these without a traceback.
"""


class ContrastlabError(Exception):
    """Base class: an error caused by input the user can fix."""


class ConfigError(ContrastlabError, ValueError):
    """A config key is unknown, a value has the wrong type, or a combination is invalid."""


class DatasetError(ContrastlabError, ValueError):
    """A dataset is missing, or its files do not have the expected layout."""


class CheckpointError(ContrastlabError, ValueError):
    """A checkpoint is missing, truncated, corrupt, or does not match the model."""
