"""Adaptive polling: look for I/O for a moment before the event loop goes to sleep.

Theory of operation. A read at queue depth 1 waits twice: for the server's reply, then for
the application's next request. Each wait that puts the daemon to sleep costs a wake-up
when the event arrives (a context switch; on a virtual machine an inter-processor interrupt
and a trip through the hypervisor), and against a fast server those wake-ups are a large
share of the latency. So the daemon *polls* for a short while before it sleeps, with the
adaptive rule of QEMU's event loop (its ``poll-max-ns``):

* Before trio's scheduler blocks in ``epoll_wait``, :class:`AdaptivePoll` checks trio's
  epoll descriptor without blocking, again and again, for up to ``budget`` seconds. When it
  turns readable (the FUSE device, a connection, anything trio waits on), the scheduler's
  own ``epoll_wait`` returns at once: no sleep, no wake-up.
* The budget adapts to how long the loop then really waits: a wait shorter than
  ``max_budget`` that polling did not catch doubles it (from ``MIN_BUDGET``); a wait longer
  than ``max_budget`` resets it to zero. A fast server and a busy application get polling;
  a slow or distant server, and an idle mount, get none: an idle daemon never spins.
* The instrument is installed only while polling can pay, since trio's two instrument
  calls per scheduler pass cost CPU on every request (measured on 2 cores: ~10% of 4 KiB
  random reads at queue depth 16, ~20% of reads served from the block cache). It is
  removed from ``BUSY`` FUSE requests in progress until none is left (the loop rarely
  sleeps then), and after ``QUIET`` requests in a row that needed no NBD request (served
  from the cache: nothing to wait for but the application); the next request that goes
  to the server installs it again (:meth:`AdaptivePoll.enter`, :meth:`~AdaptivePoll.leave`,
  :func:`network_io`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import time

import trio

log = logging.getLogger(__name__)

MAX_BUDGET = 100e-6  # seconds; see docs/architecture.md for the measurements behind it
MIN_BUDGET = 4e-6
BUSY = 4  # requests in progress from which polling is left off until all are done
QUIET = 64  # requests in a row without NBD I/O after which polling is left off


def _epoll_descriptor() -> int | None:
    """trio's epoll descriptor: the process's only one (trio uses epoll on Linux)."""
    found = []
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return None
    for name in names:
        try:
            if os.readlink(f"/proc/self/fd/{name}") == "anon_inode:[eventpoll]":
                found.append(int(name))
        except OSError:
            continue
    return found[0] if len(found) == 1 else None


class AdaptivePoll(trio.abc.Instrument):
    """Poll an epoll descriptor briefly before each blocking wait (see the module doc).

    Args:
        epoll_fd: the descriptor trio's scheduler waits on.
        max_budget: the longest poll, in seconds.
    """

    def __init__(self, epoll_fd: int, max_budget: float) -> None:
        self.max_budget = max_budget
        self.budget = 0.0
        self.in_progress = 0
        self.active = False  # installed in the running loop
        self.network = 0  # NBD requests sent (counted by the pools it was handed to)
        self._network_seen = 0  # ...when the requests now in progress began
        self._quiet = 0  # requests in a row that sent none
        self._poll = select.poll()
        self._poll.register(epoll_fd, select.POLLIN)
        self._sleep_started = 0.0
        self.caught = 0  # waits that polling ended without sleeping
        self.slept = 0  # waits that slept

    def before_io_wait(self, timeout: float) -> None:
        if timeout <= 0:  # tasks are runnable: the scheduler only peeks
            return
        now = time.perf_counter()
        if self.budget:
            end = now + min(self.budget, timeout)
            poll = self._poll.poll
            while not poll(0):
                now = time.perf_counter()
                if now >= end:
                    break
            else:
                self.caught += 1
                return
        self._sleep_started = now

    def after_io_wait(self, timeout: float) -> None:
        if not self._sleep_started:
            return
        waited = time.perf_counter() - self._sleep_started
        self._sleep_started = 0.0
        self.slept += 1
        if waited > self.max_budget:
            self.budget = 0.0  # nothing comes that soon: sleep straight away next time
        else:  # a short wait that polling (if any) missed: poll longer next time
            self.budget = min(max(self.budget * 2, MIN_BUDGET), self.max_budget)

    def start(self) -> None:
        if not self.active:
            self.active = True
            self._sleep_started = 0.0
            trio.lowlevel.add_instrument(self)

    def stop(self) -> None:
        if self.active:
            self.active = False
            with contextlib.suppress(KeyError):  # (trio drops an instrument that raised)
                trio.lowlevel.remove_instrument(self)

    def enter(self) -> None:
        """A FUSE request (read, write, fsync) begins."""
        self.in_progress += 1
        if self.in_progress == 1:
            self._network_seen = self.network
        elif self.in_progress == BUSY:
            self.stop()

    def leave(self) -> None:
        """A FUSE request is done."""
        self.in_progress -= 1
        if self.in_progress:
            return
        if self.network != self._network_seen:  # waited for the server: polling pays
            self._quiet = 0
            self.start()
        else:
            self._quiet += 1
            if self._quiet >= QUIET:
                self.stop()


def install(max_budget: float) -> AdaptivePoll | None:
    """Add adaptive polling to the running trio loop (None: off, or not possible here)."""
    if max_budget <= 0:
        return None
    fd = _epoll_descriptor()
    if fd is None:
        log.info("adaptive polling is off: trio's epoll descriptor was not found")
        return None
    instrument = AdaptivePoll(fd, max_budget)
    instrument.start()
    return instrument
