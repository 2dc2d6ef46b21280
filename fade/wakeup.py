"""A wake-up pipe: how one thread (or a signal handler) ends another's poll at once.

The broker, the client's I/O thread and a worker each poll a socket and this
pipe's read end; :meth:`WakePipe.wake` writes a byte (never blocking, safe from a
signal handler), :meth:`WakePipe.clear` empties it before the waker's work is
looked at, so that a wake-up sent after the clear is never lost.
"""

from __future__ import annotations

import os
import select
import selectors

__all__ = ["Sleeper", "WakePipe"]


class WakePipe:
    """A non-blocking pipe; poll :attr:`fd` for input."""

    def __init__(self) -> None:
        self.fd, self._write_fd = os.pipe()
        os.set_blocking(self.fd, False)
        os.set_blocking(self._write_fd, False)
        self._closed = False

    def wake(self) -> None:
        """Make the next (or the current) poll of :attr:`fd` return; never blocks."""
        try:
            os.write(self._write_fd, b"!")
        except OSError:  # full (a wake-up is pending anyway) or closed
            pass

    def clear(self) -> None:
        """Read every pending byte."""
        try:
            while os.read(self.fd, 4096):
                pass
        except OSError:  # BlockingIOError: empty
            pass

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self.fd)
            os.close(self._write_fd)


class Sleeper:
    """Where an I/O thread sleeps: on its wake-up pipe and, unless muted, on a socket's
    descriptor. With epoll, muting takes effect at once, even for a thread already
    asleep, and costs one system call. The selectors fallback (where there is no epoll,
    or when ``use_epoll`` is False) costs about four times as much per round trip, and
    mutes only the sleeps that begin afterwards: a sleep under way may end early, which
    costs its thread one idle pass (it then waits for the baton), never a lost message."""

    def __init__(self, wake_fd: int, use_epoll: bool | None = None) -> None:
        if use_epoll is None:
            use_epoll = hasattr(select, "epoll")
        self._wake_fd = wake_fd
        self._socket_fd = -1
        self._epoll = select.epoll() if use_epoll else None
        # Not DefaultSelector: it would be epoll again where there is one.
        self._selector = _portable_selector() if self._epoll is None else None
        self._add(wake_fd)

    def watch(self, fd: int) -> None:
        """Sleep on this socket descriptor from now on."""
        self.forget()
        self._socket_fd = fd
        self._add(fd)

    def forget(self) -> None:
        """Stop watching the socket descriptor (before its socket is closed)."""
        if self._socket_fd >= 0:
            if self._epoll is not None:
                self._epoll.unregister(self._socket_fd)
            else:
                assert self._selector is not None
                self._selector.unregister(self._socket_fd)
            self._socket_fd = -1

    def mute(self) -> None:
        if self._epoll is not None:
            self._epoll.modify(self._socket_fd, 0)
        else:
            assert self._selector is not None
            self._selector.unregister(self._socket_fd)

    def unmute(self) -> None:
        if self._epoll is not None:
            self._epoll.modify(self._socket_fd, select.EPOLLIN)
        else:
            self._add(self._socket_fd)

    def sleep(self, timeout: float) -> bool:
        """Until input, a wake-up or ``timeout``; True if woken through the pipe."""
        if self._epoll is not None:
            return any(fd == self._wake_fd for fd, _ in self._epoll.poll(timeout))
        assert self._selector is not None
        return any(key.fd == self._wake_fd for key, _ in self._selector.select(timeout))

    def close(self) -> None:
        if self._epoll is not None:
            self._epoll.close()
        else:
            assert self._selector is not None
            self._selector.close()

    def _add(self, fd: int) -> None:
        if self._epoll is not None:
            self._epoll.register(fd, select.EPOLLIN)
        else:
            assert self._selector is not None
            self._selector.register(fd, selectors.EVENT_READ)


def _portable_selector() -> selectors.BaseSelector:
    if hasattr(selectors, "PollSelector"):
        return selectors.PollSelector()
    return selectors.SelectSelector()
