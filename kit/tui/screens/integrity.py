"""Check every file on the stick against its manifest, with progress, then the state of each file."""

from __future__ import annotations

import threading

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.content import Content
from textual.message import Message
from textual.screen import ModalScreen
from textual.widgets import DataTable, Footer, Static

from kit import integrity
from kit.tui.text import duration, human_bytes
from kit.tui.widgets.progress import ByteProgress, throttled_progress

_ORDER = {integrity.CORRUPT: 0, integrity.MISSING: 1, integrity.UNEXPECTED: 2, integrity.OK: 3}


class _Cancelled(Exception):
    pass


def summary_text(report: integrity.VerifyReport) -> str:
    c = report.counts()
    rate = report.bytes_hashed / report.seconds if report.seconds else 0
    verdict = ("The stick is intact: every file matches." if report.ok else
               "The stick is damaged: do not trust the files marked above. Copy it again from a good stick.")
    return (f"{verdict}\n{c['ok']} ok, {c['corrupt']} corrupt, {c['missing']} missing, "
            f"{c['unexpected']} unexpected · {human_bytes(report.bytes_hashed)} in {duration(report.seconds)}"
            + (f" ({human_bytes(rate)}/s)" if rate else ""))


class IntegrityScreen(ModalScreen):
    BINDINGS = [
        Binding("r", "run", "Check again", tooltip="Check every file again"),
        Binding("escape", "close", "Back", tooltip="Back (stops a check in progress)"),
    ]

    class ProgressUpdate(Message):
        def __init__(self, progress: integrity.Progress):
            super().__init__()
            self.progress = progress

    class Finished(Message):
        def __init__(self, report: integrity.VerifyReport | None, error: str = ""):
            super().__init__()
            self.report, self.error = report, error

    def __init__(self, bundle, manifest):
        super().__init__()
        self.bundle = bundle
        self.manifest = manifest
        self.cancel = threading.Event()
        self.running = False
        self.report: integrity.VerifyReport | None = None

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog", id="integrity-box"):
            total = sum(f.size for f in self.manifest.files)
            yield Static(Content(f"Checking {len(self.manifest.files)} files ({human_bytes(total)}) "
                                 "against the stick's manifest (BLAKE3)."), classes="dialog-title")
            yield ByteProgress("Checking", id="integrity-progress")
            yield Static(id="integrity-summary")
            table = DataTable(id="integrity-table", cursor_type="row", zebra_stripes=False)
            table.add_columns("state", "file", "detail")
            yield table
        yield Footer()

    def on_mount(self) -> None:
        self.query_one(DataTable).focus()
        self.action_run()

    def on_unmount(self) -> None:
        self.cancel.set()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "run":
            return None if self.running else True
        return True

    def action_run(self) -> None:
        if self.running:
            return
        self.running = True
        self.query_one(DataTable).clear()
        self.query_one("#integrity-summary", Static).update(Content("Checking..."))
        self.refresh_bindings()
        self.verify()

    @work(thread=True, exclusive=True, group="verify")
    def verify(self) -> None:
        on_progress = throttled_progress(lambda p: self.post_message(self.ProgressUpdate(p)), self.cancel,
                                         _Cancelled)

        try:
            report = integrity.verify_bundle(self.bundle.kit, self.manifest, progress=on_progress)
        except _Cancelled:
            return
        except OSError as err:  # the stick went away mid-check
            self.post_message(self.Finished(None, f"The check stopped: {err.strerror or err}"))
            return
        self.post_message(self.Finished(report))

    def on_integrity_screen_progress_update(self, message: ProgressUpdate) -> None:
        self.query_one(ByteProgress).show(message.progress)

    def on_integrity_screen_finished(self, message: Finished) -> None:
        self.running = False
        self.refresh_bindings()
        summary = self.query_one("#integrity-summary", Static)
        if message.report is None:
            summary.update(Content(message.error))
            return
        self.report = message.report
        summary.update(Content(summary_text(message.report)))
        table = self.query_one(DataTable)
        for f in sorted(message.report.files, key=lambda f: (_ORDER.get(f.state, 9), f.path)):
            table.add_row(Text(f.state.upper()), Text(f.path), Text(f.detail or ""))

    def action_close(self) -> None:
        self.cancel.set()
        self.dismiss(None)
