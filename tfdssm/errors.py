"""Typed exceptions: every user mistake surfaces as one of these.

All inherit from :class:`TfdssmError`, so ``except tfdssm.TfdssmError`` catches
anything tfdssm raises on purpose. The ``ValueError`` bases keep ``except
ValueError`` code working.

Problems tfdssm can work around (empty cells, repeated candidates, a table too
small to split) are warnings of class :class:`DataWarning`, a
:class:`TfdssmWarning`; silence them with
``warnings.simplefilter("ignore", tfdssm.TfdssmWarning)``. Progress goes to the
``logging.getLogger("tfdssm")`` logger; tfdssm itself never prints.
"""


class TfdssmError(Exception):
    """Base class of every error tfdssm raises for a user mistake."""


class DataError(TfdssmError, ValueError):
    """Input data is missing, malformed, or does not match the feature specs."""


class ConfigError(TfdssmError, ValueError):
    """An argument or a configuration value is out of range or inconsistent."""


class ExportError(TfdssmError):
    """An export directory is missing, incomplete, or not a tfdssm export."""


class ServingError(TfdssmError):
    """A model server rejected or failed a request (or could not start).

    Attributes:
        code: The gRPC status code name (``INVALID_ARGUMENT``, ``NOT_FOUND``,
            ``FAILED_PRECONDITION``, ``UNAVAILABLE``, ...), as TF Serving uses them.
    """

    def __init__(self, message: str, code: str = "INVALID_ARGUMENT") -> None:
        super().__init__(message)
        self.code = code


class TfdssmWarning(UserWarning):
    """Base class of every warning tfdssm issues."""


class DataWarning(TfdssmWarning):
    """Input data has a problem tfdssm works around (the message says how)."""
