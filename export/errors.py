"""Errors of the export pipeline. Each one carries a message a user can act on; the CLI turns
any `ExportError` into a non-zero exit with that message."""
from __future__ import annotations


class ExportError(Exception):
    """Base class: the export cannot go on."""


class DataError(ExportError):
    """Training/held-out data is missing, unreadable or does not match its manifest."""


class CheckpointError(ExportError):
    """A checkpoint file does not load or does not fit the profile."""


class GateError(ExportError):
    """A quality or parity gate failed; nothing is published."""


class VersionExistsError(ExportError):
    """The export version directory exists already; versions are never overwritten."""


class IntegrityError(ExportError):
    """A file of an export does not match the sha256/size recorded in its metadata."""
