"""Graceful stop on SIGINT / SIGTERM as a context manager.

    with StopSignal() as stop:
        while not stop.requested: ...      # the first signal only sets `requested`

Inside the block the first SIGINT or SIGTERM sets `requested` (and says so once on the console,
`announce`); a second one raises KeyboardInterrupt at once. Leaving the block, however it is left,
restores the handlers that were installed before. Off the main thread (where Python cannot install
handlers) the block installs nothing and only an explicit `request()` stops.
"""
from __future__ import annotations

import os
import signal
import threading
from types import FrameType

from tqdm import tqdm

__all__ = ["StopSignal"]

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignal:
    def __init__(self, announce: bool = True) -> None:
        self.announce = announce
        self.requested = False
        self._previous: dict[int, object] = {}

    def request(self) -> None:
        """Ask to stop, as the first signal does."""
        self.requested = True

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if os.getpid() != self._owner:   # a forked DataLoader worker: the trainer decides and
            return                       # shuts the workers down when it stops
        if self.requested:
            raise KeyboardInterrupt
        self.request()
        if self.announce:
            tqdm.write(f"{signal.Signals(signum).name}: stopping after this step and saving last.pt "
                       f"(send again to abort at once)")

    def __enter__(self) -> "StopSignal":
        self.requested = False
        if threading.current_thread() is threading.main_thread():
            self._owner = os.getpid()
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        previous, self._previous = self._previous, {}
        for s, h in previous.items():
            signal.signal(s, signal.SIG_DFL if h is None else h)
