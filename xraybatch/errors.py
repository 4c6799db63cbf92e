"""Exceptions raised by xraybatch.

Every message states what went wrong and, where the user can act, how to fix it. The pipeline turns
``InvalidInputError`` into the state ``rejected`` and ``NotApplicableError`` into ``not_applicable``; the CLI
turns any ``XrayBatchError`` into ``Error: <message>`` and exit code 1.
"""

from __future__ import annotations


class XrayBatchError(Exception):
    """Base class of every error xraybatch raises on purpose."""

    default_message = "xraybatch failed"

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or self.default_message)


class ConfigError(XrayBatchError):
    """The settings (TOML file, environment or flags) are invalid."""

    default_message = "invalid configuration; run `xraybatch config show` to see the resolved settings"


class InvalidInputError(XrayBatchError):
    """The file is not DICOM, is damaged, or holds no usable image (state ``rejected``)."""

    default_message = "the file is not a readable DICOM image"


class NotApplicableError(XrayBatchError):
    """A valid DICOM file that is not a chest PA/AP radiograph (state ``not_applicable``)."""

    default_message = "not a chest PA/AP radiograph"


class ModelError(XrayBatchError):
    """A model bundle is missing, malformed, or its weights do not match their sha256."""

    default_message = (
        "no usable model bundle; install one with `xraybatch train ... --out DIR` and point "
        "[model] bundles at it, or reinstall xraybatch to restore the shipped bundles"
    )


class PersistError(XrayBatchError):
    """The results database could not be reached or written."""

    default_message = "the results database could not be written; check [db] url and that the server is up"


class WriteBackError(XrayBatchError):
    """A DICOM output could not be built or written."""

    default_message = "a DICOM output could not be written; check that the outbox folder is writable"


class DecoderCrashedError(InvalidInputError):
    """A native pixel decoder crashed or hung on the file; only that file is rejected (state ``rejected``)."""

    default_message = "the pixel data could not be decoded: the decoder crashed"
