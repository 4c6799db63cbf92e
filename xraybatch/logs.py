"""Keep patient data out of log lines, library warnings and tracebacks included.

pydicom, highdicom and the decoders quote element values in their warnings and exception messages
("Invalid value for VR PN: 'DOE^JANE'", "Unable to convert '01.02.1970' to 'DA' object"); a value can be a
patient's name or birth date. :func:`install` (called by the CLI's logging set-up, never at import) routes
Python warnings through :mod:`logging` (``logging.captureWarnings``; no warning is filtered) and puts a
:class:`MaskingFilter` on the handler, which masks every quoted value in messages from other libraries and in
every exception text, keeping the rest of the message (the element, the VR, the rule that failed).

Our own messages never quote element values (reasons name the element, see :func:`describe_error`), so they
are not masked: ``ViewPosition 'LL' not in ingest.views`` stays readable.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import traceback

MASK = "'<value withheld>'"

# A quoted value as repr() writes it: 'text', "text" and b'bytes' (escaped quotes inside included).
_QUOTED = re.compile(r"b?'(?:[^'\\\n]|\\.)*'" r'|b?"(?:[^"\\\n]|\\.)*"')
# A date-like run of digits (YYYYMMDD, YYYY-MM-DD, DD.MM.YYYY ...) that a message may carry unquoted.
_DATE = re.compile(r"(?<![\d.])(?:\d{8}|\d{4}[-./]\d{1,2}[-./]\d{1,2}|\d{1,2}[-./]\d{1,2}[-./]\d{4})(?![\d.])")
_OWN = ("xraybatch", "training")
_ENV = "XRB_MASKED_WARNINGS"  # set by install(): worker processes started afterwards mask theirs too
_installed = False


def mask_values(text: str) -> str:
    """``text`` with every quoted value replaced by ``'<value withheld>'``.

    >>> mask_values("Invalid value for VR PN: 'DOE^JANE'")
    "Invalid value for VR PN: '<value withheld>'"
    """
    return _QUOTED.sub(MASK, text)


def mask_exception_text(text: str) -> str:
    """An exception message with quoted values and date-like digit runs withheld."""
    return _DATE.sub("<date withheld>", mask_values(text))


def describe_error(err: BaseException) -> str:
    """``TypeName in module.function`` for an unexpected exception: where it happened, never its message.

    Used for the reasons stored in the results DB, which people read with the patient data out of sight.
    """
    frames = traceback.extract_tb(err.__traceback__) if err.__traceback__ is not None else []
    if not frames:
        return type(err).__name__
    last = frames[-1]
    where = last.filename.replace("\\", "/")
    for marker in ("/site-packages/", "/xraybatch/", "/training/"):
        if marker in where:
            prefix = "" if marker == "/site-packages/" else marker.strip("/") + "/"
            where = prefix + where.rsplit(marker, 1)[1]
            break
    else:
        where = where.rsplit("/", 1)[-1]
    return f"{type(err).__name__} in {where}:{last.lineno} ({last.name})"


def format_exception(exc_info: tuple[type[BaseException], BaseException, object] | BaseException) -> str:
    """A traceback whose exception lines (type and message, chained causes included) are masked."""
    err = exc_info if isinstance(exc_info, BaseException) else exc_info[1]
    lines = traceback.format_exception(type(err), err, err.__traceback__)
    return "".join(
        line if line.startswith(("  ", "Traceback", "\n", "During handling", "The above exception"))
        else mask_exception_text(line)
        for line in lines
    ).rstrip("\n")


class MaskingFilter(logging.Filter):
    """Masks quoted values in other libraries' messages, and every exception text (traceback kept)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "_xraybatch_masked", False):
            return True
        own = record.name.split(".", 1)[0] in _OWN
        if not own:
            record.msg = mask_exception_text(record.getMessage())
            record.args = None
        if record.exc_info and record.exc_info[1] is not None:
            record.msg = f"{record.getMessage()}\n{format_exception(record.exc_info[1])}"
            record.args = None
            record.exc_info = None
            record.exc_text = None
        record._xraybatch_masked = True
        return True


def install(handler: logging.Handler) -> None:
    """Route Python warnings to ``handler`` through logging, and mask what ``handler`` writes.

    Idempotent. The warnings are not filtered: each still reaches the log once per place it is raised (the
    ``warnings`` module's default), masked.
    """
    if not any(isinstance(f, MaskingFilter) for f in handler.filters):
        handler.addFilter(MaskingFilter())
    pydicom_logger = logging.getLogger("pydicom")  # pydicom logs each warning too, to any root handler
    if not any(isinstance(f, MaskingFilter) for f in pydicom_logger.filters):
        pydicom_logger.addFilter(MaskingFilter())
    logging.captureWarnings(True)
    py_warnings = logging.getLogger("py.warnings")
    py_warnings.handlers = [handler]
    py_warnings.propagate = False
    py_warnings.setLevel(logging.WARNING)
    global _installed
    _installed = True
    os.environ[_ENV] = "1"


def install_in_worker() -> None:
    """In a worker process (forkserver, spawn) of a process that called :func:`install`: the same for it.

    Such a process starts without the CLI's logging set-up, so a library warning raised there would reach
    stderr unmasked. Called by the decode path (:func:`xraybatch.ingest.read`); cheap after the first call.
    """
    if _installed or os.environ.get(_ENV) != "1":
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    install(handler)
