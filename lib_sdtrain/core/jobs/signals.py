"""Core: a termination signal (SIGTERM, Ctrl-C) during a run saves it before the process goes.

The handler stops every job the way Stop does — within one step, the file saved and a resume point
kept (core/training/resume.py) — waits for that, then lets the signal do what it did before: the
previous handler runs (the webui's own exits the process), or the default action ends it.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any

log = logging.getLogger(__name__)

#: set on a handler this module installed, so installing twice (a webui Reload UI) does not stack
_MARK = "__sdtrain_stops_jobs__"


def stop_jobs_on_signals(service: Any, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT),
                         timeout: float = 120.0) -> list[int]:
    """Install the handler for `signals` (only possible from the main thread); returns those installed."""
    if threading.current_thread() is not threading.main_thread():
        return []
    installed = []
    for sig in signals:
        previous = signal.getsignal(sig)
        if getattr(previous, _MARK, False):
            previous = getattr(previous, "__sdtrain_previous__", signal.SIG_DFL)

        def handler(signum, frame, previous=previous):
            log.warning("sdtrain: %s: stopping running jobs (each saves and keeps a resume point)",
                        signal.Signals(signum).name)
            try:
                service.shutdown(timeout=timeout)
            finally:
                if callable(previous):
                    previous(signum, frame)
                elif previous != signal.SIG_IGN:
                    signal.signal(signum, signal.SIG_DFL)
                    os.kill(os.getpid(), signum)

        setattr(handler, _MARK, True)
        handler.__sdtrain_previous__ = previous  # type: ignore[attr-defined]
        signal.signal(sig, handler)
        installed.append(sig)
    return installed
