"""A loop in a daemon thread that `stop` ends: the shape of the service's background parts."""

from __future__ import annotations

import threading


class BackgroundLoop:
    thread_name = "background"

    def __init__(self) -> None:
        self.stop_event = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name=self.thread_name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self.stop_event.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def run(self) -> None:
        raise NotImplementedError
