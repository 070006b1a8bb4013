"""This computer and the plan: what `kit doctor` shows, from the running session (nothing re-probed)."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.content import Content
from textual.screen import ModalScreen
from textual.widgets import Footer, Static


def doctor_report(session) -> dict:
    """The same shape as kit.launch.doctor()'s report, from what start() already found."""
    manifest = session.manifest
    return {
        "stick": str(session.bundle.root),
        "host": session.host.to_dict(),
        "kernel": session.kernel.to_dict(),
        "plan": session.plan.to_dict(),
        "models": [{"id": m.id, "name": m.name, "bytes": manifest.model_size(m), "quant": m.quant,
                    "params": m.params} for m in manifest.models],
    }


def hardware_text(session) -> str:
    from kit.cli import render_doctor  # one renderer for `kit doctor` and this screen

    text = f"Stick: {session.bundle.root}\n\n" + render_doctor(doctor_report(session))
    if session.steps:
        text += "\n\nFallbacks taken while starting:\n" + "\n".join(f"  {s}" for s in session.steps)
    state = session.state if session.state is not None else "none: the stick is read-only, nothing is saved"
    return text + f"\n\nState folder: {state}"


class HardwareScreen(ModalScreen):
    BINDINGS = [Binding("escape,q", "close", "Back")]

    def __init__(self, session):
        super().__init__()
        self.session = session

    def compose(self) -> ComposeResult:
        with VerticalScroll(classes="dialog", id="hardware-box"):
            yield Static(Content("This computer and the kit's choices"), classes="dialog-title")
            yield Static(Content(hardware_text(self.session)), id="hardware-text")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#hardware-box").focus()

    def action_close(self) -> None:
        self.dismiss(None)
