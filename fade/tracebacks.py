"""A task's traceback, taken apart on the worker and put together on the client.

::

    worker: TracebackException(exc) ── each frame's file name swapped for a token ──> template
            RemoteTrace(template, token, frames=[(file, line, name, source line)...])
                │  pickled with the exception (RAISED)
                ▼
    client: every token ─> the client's own file for that frame
                 <cache>/trees/<version>/mylib/model.py ─> the file this client shipped it from
                 a function shipped by value: its own file name (fade keeps it, see
                 fade/serialization.py) ─> as is
            a frame the worker had no source line for ─> the line from the client's copy
            ─> RemoteTraceback(text, frames), the ``__cause__`` of the original exception

The text is Python's own formatting (chained exceptions, groups, notes, carets)
with only file names and missing source lines changed, so editors and IDEs that
follow ``File "...", line N`` land on the user's line. Lines of shipped modules
come from the exact content that ran, even if the file was edited since.
"""

from __future__ import annotations

import linecache
import re
import traceback
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from fade.errors import RemoteTraceback

__all__ = ["Frame", "RemoteTrace", "capture", "remote_cause"]

#: (file name, line number, function name, source line or ""); the function name is ""
#: for the location of a SyntaxError, which has no frame.
Frame = tuple[str, int, str, str]

#: Maps a worker's file name to this host's, with the source lines if it knows them.
Resolve = Callable[[str], "tuple[str, list[str] | None] | None"]


@dataclass(frozen=True, slots=True)
class RemoteTrace:
    """A worker's formatted traceback with a token in place of every frame's file name."""

    template: str
    token: str
    frames: tuple[Frame, ...]

    def render(self, resolve: Resolve | None = None) -> tuple[str, tuple[Frame, ...]]:
        """The text and frames with file names mapped by ``resolve`` (None: as on the
        worker) and missing source lines filled in from this host's copy."""
        frames = tuple(_local_frame(frame, resolve) for frame in self.frames)
        pattern = re.compile(re.escape(self.token) + r"(\d+)\x00")
        out = []
        for text_line in self.template.splitlines(keepends=True):
            match = pattern.search(text_line)
            if match is None or int(match[1]) >= len(frames):
                out.append(text_line)
                continue
            index = int(match[1])
            filename, _, name, line = frames[index]
            out.append(text_line[: match.start()] + filename + text_line[match.end() :])
            if name and line and not self.frames[index][3]:
                out.append(f"    {line}\n")  # the worker had no source for this frame
        return "".join(out), frames


def capture(exc: BaseException) -> RemoteTrace:
    """Take apart the traceback of ``exc`` (on the worker, where it was raised)."""
    te = traceback.TracebackException(type(exc), exc, exc.__traceback__)
    token = f"\x00{uuid.uuid4().hex[:12]}:"
    frames: list[Frame] = []
    for summary in _summaries(te, set()):
        line = (summary.line or "").strip()  # looked up before the name is swapped
        frames.append((summary.filename, summary.lineno or 0, summary.name, line))
        summary.filename = f"{token}{len(frames) - 1}\x00"
    if isinstance(getattr(te, "filename", None), str) and issubclass(exc.__class__, SyntaxError):
        frames.append((te.filename, int(getattr(te, "lineno", 0) or 0), "", ""))
        te.filename = f"{token}{len(frames) - 1}\x00"
    return RemoteTrace("".join(te.format()), token, tuple(frames))


def _summaries(
    te: traceback.TracebackException, seen: set[int]
) -> Iterator[traceback.FrameSummary]:
    """Every frame of the exception, its causes, contexts and group members."""
    if id(te) in seen:
        return
    seen.add(id(te))
    yield from te.stack
    for other in (te.__cause__, te.__context__, *(getattr(te, "exceptions", None) or ())):
        if other is not None:
            yield from _summaries(other, seen)


def _local_frame(frame: Frame, resolve: Resolve | None) -> Frame:
    filename, lineno, name, line = frame
    found = resolve(filename) if resolve is not None else None
    lines = None
    if found is not None:
        filename, lines = found
    if not line and name and lineno > 0:
        if lines is not None:
            line = lines[lineno - 1].strip() if lineno <= len(lines) else ""
        else:
            line = linecache.getline(filename, lineno).strip()
    return filename, lineno, name, line


def remote_cause(trace: RemoteTrace | str, resolve: Resolve | None = None) -> RemoteTraceback:
    """The ``__cause__`` to give a task's exception on the client."""
    if isinstance(trace, str):  # a worker that sent text only
        return RemoteTraceback(f'\n"""\n{trace}"""')
    try:
        text, frames = trace.render(resolve)
    except Exception:  # a mapping gone wrong must never hide the task's own error
        text, frames = trace.render(None)
    return RemoteTraceback(f'\n"""\n{text}"""', frames)
