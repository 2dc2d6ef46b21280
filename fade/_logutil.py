"""What fade does before peer-supplied text reaches an operator's log or terminal.

* :func:`printable` escapes control characters in a peer-supplied string and
  bounds its length: a worker whose HELLO says its host is
  ``"x\\n2026-01-01 ... INFO forged"`` cannot forge a log line, and one named
  ``"\\x1b[2J"`` cannot clear the terminal of whoever runs ``fade-status``.
* :class:`OneLineFormatter` applies the same escaping (without the bound) to
  every message a command's log prints, for the peer text that reaches a log
  by another road (an exception message quoting a peer's input, say).
* :class:`RateLimitedLog` stops a flood of bad input from flooding the log.
"""

from __future__ import annotations

import logging
import time
from typing import Any

__all__ = ["MAX_PRINTABLE", "OneLineFormatter", "RateLimitedLog", "printable"]

#: How many characters of one peer-supplied string an operator is shown, at most.
MAX_PRINTABLE = 200

#: Escapes for the characters a reader would otherwise mistake; the backslash is
#: escaped too, so an escaped name cannot pass itself off as another.
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}


def printable(value: object, limit: int | None = MAX_PRINTABLE, *, backslash: bool = True) -> str:
    """``value`` as text safe to put in a log line or on a terminal.

    Control characters (C0, DEL, C1, ANSI escapes), line and paragraph
    separators, bidirectional overrides and other invisible format characters
    are written as Python-style escapes (``\\n``, ``\\x1b``, ``\\u202e``), and a
    backslash as ``\\\\`` (unless not ``backslash``); printable text, including
    non-ASCII letters, is left alone. At most ``limit`` characters are kept
    (None: all), then ``...``.
    """
    text = value if isinstance(value, str) else str(value)
    if (
        (limit is None or len(text) <= limit)
        and text.isprintable()
        and not (backslash and "\\" in text)
    ):
        return text
    out: list[str] = []
    size = 0
    for ch in text:
        if ch == "\\" and not backslash:
            piece = ch
        else:
            piece = _NAMED.get(ch) or (ch if ch.isprintable() else _escape(ch))
        if limit is not None and size + len(piece) > limit:
            out.append("...")
            break
        out.append(piece)
        size += len(piece)
    return "".join(out)


def _escape(ch: str) -> str:
    code = ord(ch)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


class OneLineFormatter(logging.Formatter):
    """A formatter whose messages are always one line with no control characters.

    Only the message is escaped: a traceback appended to it keeps its lines. A
    backslash stays as it is, so names :func:`printable` already escaped are not
    escaped twice.
    """

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = printable(record.message, limit=None, backslash=False)
        return super().formatMessage(record)


class RateLimitedLog:
    """Log at most ``burst`` records per ``period`` seconds; count and report the rest."""

    def __init__(self, logger: logging.Logger, burst: int = 10, period: float = 10.0) -> None:
        self._logger = logger
        self._burst = burst
        self._period = period
        self._window_start = time.monotonic()
        self._count = 0
        self._suppressed = 0

    def warning(self, msg: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._window_start >= self._period:
            if self._suppressed:
                self._logger.warning("... %d similar messages suppressed", self._suppressed)
            self._window_start, self._count, self._suppressed = now, 0, 0
        self._count += 1
        if self._count <= self._burst:
            self._logger.warning(msg, *args)
        else:
            self._suppressed += 1
