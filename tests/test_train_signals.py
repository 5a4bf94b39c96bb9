"""StopSignal: the first SIGINT/SIGTERM only asks to stop, a second aborts, leaving the block
restores the previous handlers (also on an exception), nothing is installed off the main thread."""
from __future__ import annotations

import os
import signal
import threading

import pytest

from yolocompress.train.signals import StopSignal


@pytest.fixture
def previous_handlers():
    """Custom handlers installed before the block, restored after the test whatever happens."""
    def mine(signum, frame):
        raise AssertionError("the test's own handler must not run inside the block")

    saved = {s: signal.signal(s, mine) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield mine
    finally:
        for s, h in saved.items():
            signal.signal(s, h)


@pytest.mark.parametrize("first, second", [(signal.SIGTERM, signal.SIGINT),
                                           (signal.SIGINT, signal.SIGINT)])
def test_first_signal_requests_second_aborts_then_handlers_restored(previous_handlers, capsys,
                                                                    first, second):
    with StopSignal() as stop:
        assert signal.getsignal(signal.SIGINT) is not previous_handlers
        assert not stop.requested
        os.kill(os.getpid(), first)
        assert stop.requested
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), second)
    assert signal.getsignal(signal.SIGINT) is previous_handlers
    assert signal.getsignal(signal.SIGTERM) is previous_handlers
    assert capsys.readouterr().out == (f"{first.name}: stopping after this step and saving last.pt "
                                       f"(send again to abort at once)\n")


def test_handlers_restored_when_the_block_raises_and_requested_resets(previous_handlers, capsys):
    stop = StopSignal(announce=False)
    with pytest.raises(ValueError):
        with stop:
            os.kill(os.getpid(), signal.SIGTERM)
            raise ValueError("training failed")
    assert stop.requested
    assert signal.getsignal(signal.SIGTERM) is previous_handlers
    assert capsys.readouterr().out == ""   # announce=False: quiet (e.g. ranks other than 0)
    with stop:   # entering again starts without a pending request
        assert not stop.requested
        stop.request()
        assert stop.requested
    assert signal.getsignal(signal.SIGINT) is previous_handlers


def test_off_the_main_thread_nothing_is_installed(previous_handlers):
    seen = {}

    def run():
        with StopSignal() as stop:
            seen["handler"] = signal.getsignal(signal.SIGTERM)
            stop.request()
            seen["requested"] = stop.requested

    th = threading.Thread(target=run)
    th.start()
    th.join()
    assert seen == {"handler": previous_handlers, "requested": True}
    assert signal.getsignal(signal.SIGTERM) is previous_handlers
