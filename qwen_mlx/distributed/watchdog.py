"""A rank's failures end it with one line: a lost connection, a rank that stopped answering (the watchdog thread
sees a deadline pass even while the main thread is blocked inside MLX), SIGTERM from mlx.launch, a user error."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager

import mlx.core as mx

from qwen_mlx.distributed.plan import DistributedError
from qwen_mlx.errors import UserError

LOST = "lost the connection to another rank (it exited or its host became unreachable); stopping"


def _die(rank: int, message: str, code: int = 1) -> None:
    sys.stdout.flush()
    sys.stderr.write(f"qwen-mlx distributed: rank {rank}: {message}\n")
    sys.stderr.flush()
    os._exit(code)  # other threads may be blocked in a socket: do not wait for them


def _connection_lost(e: RuntimeError) -> bool:
    return "[ring]" in str(e) or "peer" in str(e)


class Watchdog:
    """Ends the process with one clear line when an exchange with the other ranks fails (a rank exited: its sockets
    closed) or takes longer than `timeout` (a host that vanished without closing its sockets, a rank stuck
    elsewhere), or on SIGTERM, which mlx.launch sends to every rank when one of them ends early. The last two are
    noticed by this thread even while the main thread is blocked inside MLX (where Python signal handlers cannot
    run). `on_exit` runs first (the chat app gives the terminal back there)."""

    def __init__(self, rank: int, timeout: float):
        self.rank, self.timeout = rank, timeout
        self.started = False  # set once every rank has loaded and generation begins
        self.on_exit: Callable[[], None] | None = None
        self._deadline: float | None = None
        self._what = ""
        self._signals = None
        if threading.current_thread() is threading.main_thread():
            import socket

            self._signals, wake = socket.socketpair()
            wake.setblocking(False)
            self._wake = wake  # kept open: the C-level handler writes each signal number to it
            signal.set_wakeup_fd(wake.fileno(), warn_on_full_buffer=False)
            signal.signal(signal.SIGTERM, lambda *_: self._terminated())
        threading.Thread(target=self._watch, daemon=True).start()

    @contextmanager
    def guard(self, what: str, *, limited: bool = True):
        """An exchange with the other ranks: bounded by `timeout` unless not `limited` (a rank waiting for the
        user's next message); a lost connection inside it ends the rank."""
        self._what, self._deadline = what, (time.monotonic() + self.timeout) if limited else None
        try:
            yield
        except RuntimeError as e:
            if _connection_lost(e):
                self.fail(f"{LOST} ({e})")
            raise
        finally:
            self._deadline = None

    def renew(self, what: str) -> None:
        """Inside a guard that spans many exchanges (a reply's decode steps): the next one has `timeout` again."""
        self._what, self._deadline = what, time.monotonic() + self.timeout

    def fail(self, message: str, code: int = 1) -> None:
        if self.on_exit is not None:
            try:
                self.on_exit()
            except Exception:  # the line below matters more than a clean screen
                pass
        _die(self.rank, message, code)

    def _terminated(self) -> None:
        if not self.started:  # a rank that failed while loading has said why; the others need not repeat it
            os._exit(1)
        self.fail("stopped by SIGTERM: mlx.launch sends it to every rank when another rank has ended (its error "
                  "is above) or on Ctrl-C")

    def _watch(self) -> None:
        import select

        while True:
            if self._signals is not None:
                ready, _, _ = select.select([self._signals], [], [], 0.1)
                if ready and signal.SIGTERM in self._signals.recv(64):
                    self._terminated()
            else:
                time.sleep(0.1)
            deadline = self._deadline
            if deadline is not None and time.monotonic() > deadline:
                self.fail(f"no answer from the other ranks within {self.timeout:g} s while {self._what}: a rank "
                          "has stopped or its host cannot be reached (raise --timeout if it is just slow)")


@contextmanager
def failures(watchdog: Watchdog):
    """A user error ends the rank with one line; one that every rank meets alike (a model that cannot be split as
    asked) is said by rank 0 only."""
    try:
        yield
    except DistributedError as e:
        if watchdog.rank == 0:
            _die(0, str(e), 2)
        time.sleep(1)  # mlx.launch stops every rank when one ends: let rank 0 say it first
        os._exit(2)
    except UserError as e:
        watchdog.fail(str(e), 2)


def connect(watchdog: Watchdog, backend: str = "any") -> mx.distributed.Group:
    """This process's group: all ranks when started by a launcher (mlx.launch sets MLX_RANK, MLX_HOSTFILE), else
    a group of one."""
    with watchdog.guard("connecting to the other ranks"):
        group = mx.distributed.init(backend=backend)
        # Ring ranks leave init one by one; past this barrier every rank is connected, so a rank that stops
        # later (a bad flag, a missing file) is seen by all the others.
        mx.eval(mx.distributed.all_sum(mx.zeros((1,)), group=group))
    watchdog.rank = group.rank()
    return group

