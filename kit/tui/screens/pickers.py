"""Pickers over the chat: the system-prompt preset (from the stick's manifest) and the model."""

from __future__ import annotations

from typing import TYPE_CHECKING

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.content import Content
from textual.screen import ModalScreen
from textual.widgets import Footer, OptionList, Static
from textual.widgets.option_list import Option

from kit.manifest import Preset
from kit.tui.text import human_bytes

if TYPE_CHECKING:  # the type only: the screens are handed a started session
    from kit.launch import Session

NO_PRESET = "-"  # option id for "no system prompt"; "-" is never a manifest id


class PresetPicker(ModalScreen):
    """Dismisses with the chosen preset id ("" for none), or False when closed."""

    BINDINGS = [Binding("escape", "close", "Back")]

    def __init__(self, presets: tuple[Preset, ...], current: str | None):
        super().__init__()
        self.presets = presets
        self.current = current

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Static(Content("How should the assistant behave?  Enter chooses, Esc goes back."),
                         classes="dialog-title")
            options = [Option(Content(_mark(p.id == self.current) + p.name + "\n    " + _preview(p.system)), p.id)
                       for p in self.presets]
            options.append(Option(Content(_mark(self.current is None) + "No preset\n    the model as it is"),
                                  NO_PRESET))
            yield OptionList(*options, id="preset-list")
        yield Footer()

    def on_mount(self) -> None:
        option_list = self.query_one(OptionList)
        ids = [p.id for p in self.presets] + [NO_PRESET]
        option_list.highlighted = ids.index(self.current) if self.current in ids else len(ids) - 1
        option_list.focus()

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        chosen = event.option.id
        self.dismiss("" if chosen == NO_PRESET else chosen)

    def action_close(self) -> None:
        self.dismiss(False)


class ModelPicker(ModalScreen):
    """Each model on the stick with its size and whether it fits this computer (the plan's verdicts).

    Dismisses with a model id, or None when closed.
    """

    BINDINGS = [Binding("escape", "close", "Back")]

    def __init__(self, session: Session):
        super().__init__()
        self.session = session

    def compose(self) -> ComposeResult:
        manifest, plan = self.session.manifest, self.session.plan
        verdicts = {v.model_id: v for v in plan.verdicts}
        options = []
        for model in manifest.models:
            verdict = verdicts.get(model.id)
            in_use = model.id == plan.model_id
            head = f"{_mark(in_use)}{model.name} · {human_bytes(manifest.model_size(model))}"
            if in_use:
                head += " · in use"
            elif verdict is not None:
                head += " · fits" if verdict.fits else " · does not fit"
            reason = verdict.reason if verdict else "not considered by the plan"
            options.append(Option(Content(f"{head}\n    {reason}"), model.id))
        with Vertical(classes="dialog"):
            yield Static(Content("Models on this stick.  Enter restarts with the one chosen "
                                 "(the conversation stays), Esc goes back."), classes="dialog-title")
            yield OptionList(*options, id="model-list")
        yield Footer()

    def on_mount(self) -> None:
        option_list = self.query_one(OptionList)
        ids = [m.id for m in self.session.manifest.models]
        option_list.highlighted = ids.index(self.session.plan.model_id) if self.session.plan.model_id in ids else 0
        option_list.focus()

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(event.option.id)

    def action_close(self) -> None:
        self.dismiss(None)


def _mark(on: bool) -> str:
    return "* " if on else "  "


def _preview(text: str, width: int = 66) -> str:
    line = " ".join(text.split())
    return line if len(line) <= width else line[: width - 3] + "..."
