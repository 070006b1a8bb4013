"""A byte progress display: file, bar, bytes, MB/s and time left (kit.integrity.Progress)."""

from __future__ import annotations

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
