"""A byte progress display: file, bar, bytes, MiB/s and time left (kit.integrity.Progress)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from textual.content import Content
from textual.widget import Widget

from kit.integrity import Progress
from kit.tui.text import progress_bar, progress_details


class ByteProgress(Widget):
    """Shows the latest Progress; hidden until the first one arrives."""

    DEFAULT_CSS = """
    ByteProgress { height: 3; display: none; }
    ByteProgress.-active { display: block; }
    """

    def __init__(self, verb: str = "Checking", **kwargs):
        super().__init__(**kwargs)
        self.verb = verb
        self.progress: Progress | None = None

    def show(self, progress: Progress) -> None:
        self.progress = progress
        self.add_class("-active")
        self.refresh()

    def render(self) -> Content:
        p = self.progress
        if p is None:
            return Content("")
        fraction = p.all_done / p.all_total if p.all_total else 1.0
        width = max(10, self.size.width - 6)
        return Content(f"{self.verb} {p.path}\n{progress_bar(fraction, width)} {100 * fraction:3.0f}%\n"
                       f"{progress_details(p)}")


PROGRESS_INTERVAL_S = 0.1  # hashing reports every 8 MiB block: hundreds a second from page cache


def throttled_progress(post: Callable[[Progress], None], cancel: threading.Event,
                       cancelled: type[Exception]) -> Callable[[Progress], None]:
    """A worker-thread progress callback: posts at most every PROGRESS_INTERVAL_S (and the last
    one), and raises `cancelled` inside the worker once `cancel` is set."""
    last = 0.0

    def on_progress(p: Progress) -> None:
        nonlocal last
        if cancel.is_set():
            raise cancelled
        now = time.monotonic()
        if now - last >= PROGRESS_INTERVAL_S or p.all_done >= p.all_total:
            last = now
            post(p)

    return on_progress
