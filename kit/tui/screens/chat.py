"""The chat: ask, watch the answer stream in, stop it, start afresh, switch preset or model.

Generation runs in a worker thread and reaches the screen only as messages: first Sourced (the
question grounded in the stick's knowledge by session.grounded, as `kit ask` does: the passages
it is given, numbered), then Tokens (session.engine.answer, the loop-guarded stream every front
end uses, with a stop Event), batched to at most one a frame, and Done. The thread does no
rendering: while the model writes, the screen's work is one block's lines a frame, whatever the
length of the answer or of the conversation.

The knowledge is checked against the manifest in the library's own thread (started by the app,
which owns the session); its progress reaches the top bar as KitApp.KnowledgeChanged messages.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.content import Content
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Footer, Static
from textual.worker import Worker

from kit.conversation import LOOP_NOTE, NO_PRESET, AnswerSettings, EmptyAnswerError, default_preset
from kit.engine import GenStats
from kit.errors import KitError, KnowledgeError, PoolLost
from kit.grounding import Grounded, render_sources
from kit.history import Conversation, HistoryStore, new_conversation
from kit.knowledge import CHECKING, WAITING
from kit.passages import Passage
from kit.tui.citations import from_stored, knowledge_label, to_stored
from kit.tui.screens.hardware import HardwareScreen
from kit.tui.screens.help import HelpScreen
from kit.tui.screens.history import HistoryScreen
from kit.tui.screens.integrity import IntegrityScreen
from kit.tui.screens.pickers import ModelPicker, PresetPicker
from kit.tui.screens.sources import SourcesPicker
from kit.tui.screens.textview import TextViewScreen
from kit.tui.text import failure_parts, stats_line
from kit.tui.widgets.question import QuestionBox
from kit.tui.widgets.transcript import AnswerMessage, Transcript

if TYPE_CHECKING:  # the type only: the screens are handed a started session
    from kit.launch import Session

# Batch tokens: the answer is redrawn at most 10 times a second (a few words a frame). The model
# and the screen share the CPU: on a 2-core laptop each frame is time taken from generation.
FLUSH_S = 0.1

WELCOME = ("Type your question in the box below and press Enter to send it (Ctrl+J starts a new line).\n"
           "Everything runs on this computer: nothing is sent anywhere. Answers can be wrong; "
           "in an emergency, reach trained help.  F1 or Ctrl+G shows every key.")
KNOWLEDGE_WELCOME = ("This stick carries documents: answers cite them as [1], [2], listed under the answer. "
                     "F8 or Ctrl+E opens one; F9 or Ctrl+K turns them off or on.")


@dataclass
class Generation:
    """One answer being written: where it goes, how to stop it."""

    conversation: Conversation
    question: str
    view: AnswerMessage
    stop: threading.Event = field(default_factory=threading.Event)
    worker: Worker | None = None
    sources: tuple[Passage, ...] = ()  # what the model was given, numbered from 1
    searched: bool = False  # False: knowledge off, or none on the stick


class ChatScreen(Screen):
    BINDINGS = [
        Binding("ctrl+s", "send", "Send", priority=True, show=False,
                tooltip="Send the question from anywhere in the chat (Enter sends it from the box)"),
        Binding("escape", "stop", "Stop", priority=True, tooltip="Stop the answer being written"),
        Binding("ctrl+n", "new", "New", priority=True, tooltip="Start a new conversation"),
        Binding("f1,ctrl+g", "help", "Help", priority=True, tooltip="Show every key"),
        Binding("f2,ctrl+p", "presets", "Preset", priority=True,
                tooltip="Choose how the assistant behaves (first aid, translation, ...)"),
        Binding("f3,ctrl+l", "models", "Model", priority=True, tooltip="Choose another model on the stick"),
        Binding("f4,ctrl+o", "history", "History", priority=True,
                tooltip="Reopen, delete or export earlier conversations"),
        Binding("f5,ctrl+t", "hardware", "Hardware", priority=True, show=False,
                tooltip="This computer, the CPU kernel and why the kit chose its settings"),
        Binding("f6,ctrl+f", "integrity", "Check stick", priority=True, show=False,
                tooltip="Check every file on the stick against its manifest"),
        Binding("f7,ctrl+r", "copy", "Copy answer", priority=True, show=False,
                tooltip="Copy the last answer (and show it to select or save)"),
        Binding("f8,ctrl+e", "sources", "Sources", priority=True, show=False,  # said under each answer
                tooltip="Open one of the last answer's sources: the whole passage or article"),
        Binding("f9,ctrl+k", "knowledge", "Knowledge", priority=True, show=False,
                tooltip="Answer with or without the stick's documents (from the next question)"),
    ]

    class Tokens(Message):
        def __init__(self, generation: Generation, text: str, stats: GenStats | None):
            super().__init__()
            self.generation, self.text, self.stats = generation, text, stats

    class Done(Message):
        def __init__(self, generation: Generation, stats: GenStats | None, error: BaseException | None):
            super().__init__()
            self.generation, self.stats, self.error = generation, stats, error

    class SaveFailed(Message):
        def __init__(self, why: str):
            super().__init__()
            self.why = why

    class Sourced(Message):
        """The question was grounded: the sources it goes with (before the first token)."""

        def __init__(self, generation: Generation, grounded: Grounded, failure: str = "",
                     unchecked: tuple[str, ...] = ()):
            super().__init__()
            self.generation, self.grounded, self.failure = generation, grounded, failure
            self.unchecked = unchecked  # sources still being checked, so not searched

    class SourceText(Message):
        def __init__(self, passage: Passage, title: str, text: str, error: str = ""):
            super().__init__()
            self.passage, self.title, self.text, self.error = passage, title, text, error

    def __init__(self, session: Session, history: HistoryStore, conversation: Conversation | None = None,
                 settings: AnswerSettings | None = None, *, use_knowledge: bool = True):
        super().__init__()
        self.session = session
        self.history = history
        self.settings = settings or AnswerSettings()
        self.conversation = conversation or self.fresh_conversation(self.default_preset())
        self.generation: Generation | None = None
        self.last_stats: GenStats | None = None
        self.save_error: str | None = None
        self.use_knowledge = use_knowledge  # the toggle; applies from the next question

    # ------------------------------------------------------------------ layout

    def compose(self) -> ComposeResult:
        with Horizontal(id="topbar"):
            yield Static(id="topbar-title")
            yield Static(id="topbar-knowledge")
        if not self.history.persistent:
            yield Static(Content("Read-only stick: conversations are kept until you quit, not saved. "
                                 "F4 then E shows one to copy."), id="banner")
        yield Transcript(self.welcome_text(), id="transcript")
        yield Static(id="stats")
        question = QuestionBox(id="question", placeholder="Type your question, then press Enter")
        question.border_title = "Your question · Enter sends · Ctrl+J = new line"
        yield question
        yield Footer()

    def on_mount(self) -> None:
        if self.knowledge_on:
            self.app.check_knowledge()
        self.refresh_topbar()
        self.refresh_stats()
        if not self.conversation.empty:
            self.query_one(Transcript).call_after_refresh(self.query_one(Transcript).show,
                                                          self.conversation, self.speaker)
        self.query_one("#question", QuestionBox).focus()

    def on_unmount(self) -> None:
        if self.generation is not None:  # quitting mid-answer: let the thread end at the next token
            self.generation.stop.set()

    @property
    def speaker(self) -> str:
        return self.session.model.name

    def welcome_text(self) -> str:
        text = WELCOME
        if self.has_knowledge:
            text += "\n" + KNOWLEDGE_WELCOME
        if self.session.steps:
            text += "\nStarted with smaller settings: " + "; ".join(self.session.steps)
        return text

    def preset_name(self, preset_id: str | None) -> str:
        preset = next((p for p in self.session.manifest.presets if p.id == preset_id), None)
        return preset.name if preset else "none"

    def default_preset(self) -> str | None:
        preset = default_preset(self.session.manifest.presets)  # as `kit ask` starts
        return preset.id if preset else None

    def fresh_conversation(self, preset_id: str | None) -> Conversation:
        return new_conversation(self.session.plan.model_id, preset_id)

    def refresh_topbar(self) -> None:
        text = f"{self.speaker} · preset: {self.preset_name(self.conversation.preset_id)}"
        if self.save_error:
            text += " · NOT SAVED"
        self.query_one("#topbar-title", Static).update(Content(text))
        knowledge = knowledge_label(self.session.knowledge.states(), self.knowledge_on)
        self.query_one("#topbar-knowledge", Static).update(Content(f"  {knowledge}" if knowledge else ""))

    def refresh_stats(self, note: str = "") -> None:
        line = note or stats_line(self.last_stats, self.session.engine.n_ctx, answering=self.answering)
        self.query_one("#stats", Static).update(Content(line), layout=False)  # one line, always

    @property
    def answering(self) -> bool:
        return self.generation is not None

    @property
    def has_knowledge(self) -> bool:
        return not self.session.knowledge.empty

    @property
    def knowledge_on(self) -> bool:
        return self.use_knowledge and self.has_knowledge

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "stop":
            return self.answering
        if action == "send":
            return None if self.answering else True
        if action in ("sources", "knowledge"):
            return self.has_knowledge
        return True

    # ------------------------------------------------------------------ knowledge

    def action_knowledge(self) -> None:
        self.use_knowledge = not self.use_knowledge
        self.app.use_knowledge = self.use_knowledge  # kept over a model switch
        if self.use_knowledge:
            self.app.check_knowledge()  # with --no-knowledge nothing was checked yet
        self.refresh_topbar()
        self.refresh_stats("Knowledge on: answers cite the stick's documents (from the next question)"
                           if self.use_knowledge else
                           "Knowledge off: answers come from the model alone (from the next question)")

    def last_answer(self) -> AnswerMessage | None:
        views = list(self.query(AnswerMessage))
        return views[-1] if views else None

    def action_sources(self) -> None:
        view = self.last_answer()
        if view is None or not view.sources:
            self.refresh_stats("The last answer has no sources to open." if view is not None else
                               "Ask a question first: its sources can then be opened here.")
            return
        sources = view.sources
        self.app.push_screen(SourcesPicker(sources, view.cited),
                             lambda index: self.source_chosen(sources, index))

    def source_chosen(self, sources: tuple[Passage, ...], index: int | None) -> None:
        if index is not None:
            self.refresh_stats("Opening the source...")
            self.read_source(sources[index])

    @work(thread=True, exclusive=True, group="source")
    def read_source(self, passage: Passage) -> None:
        """A ZIM article is read from the stick and turned into text: not on the screen's thread."""
        try:
            title, text = self.session.knowledge.full_text(passage)
        except (KitError, OSError) as err:
            self.post_message(self.SourceText(passage, "", "", failure_parts(err)[0]))
            return
        self.post_message(self.SourceText(passage, title, text))

    def on_chat_screen_source_text(self, message: SourceText) -> None:
        self.refresh_stats()
        if message.error:
            self.notify(f"The source cannot be opened: {message.error}", severity="error", timeout=10,
                        markup=False)
            return
        passage = message.passage
        self.app.push_screen(TextViewScreen(
            message.title or passage.title, message.text, self.history, save_name="source",
            note=f"From {passage.source}: {passage.path}, on this stick (checked against its manifest)."))

    # ------------------------------------------------------------------ asking

    def on_question_box_send(self, _message: QuestionBox.Send) -> None:
        self.action_send()

    def action_send(self) -> None:
        # The send key is a screen binding, seen before the text box has handled the keys typed just
        # before it (a fast typist, a terminal flushing a burst): read the box after its own queue.
        self.query_one("#question", QuestionBox).call_later(self.send_now)

    def send_now(self) -> None:
        box = self.query_one("#question", QuestionBox)
        question = box.text.strip()
        if self.answering:
            return
        if not question:
            self.refresh_stats("Type a question first, then press Enter.")
            return
        conv = self.conversation
        history = conv.prompt_history()
        conv.add("user", question)
        transcript = self.query_one(Transcript)
        transcript.add_user(question)
        box.clear()
        self.generation = Generation(conv, question, transcript.add_answer(self.speaker))
        self.last_stats = None
        self.generation.worker = self.generate(self.generation, history, self.preset_for_engine(),
                                               self.knowledge_on)
        self.refresh_bindings()
        self.refresh_stats()

    def preset_for_engine(self) -> str:
        """The conversation's preset; none when it has none, or names one this stick lacks."""
        ids = {p.id for p in self.session.manifest.presets}
        return self.conversation.preset_id if self.conversation.preset_id in ids else NO_PRESET

    def ground(self, generation: Generation, history: list[dict], preset: str, use_knowledge: bool) -> Grounded:
        """The question's messages with its sources (kit.launch.Session.grounded, as `kit ask`);
        a search that fails is said and the question goes on without sources."""
        failure = ""
        unchecked = tuple(s.name for s in self.session.knowledge.states() if s.state in (WAITING, CHECKING)) \
            if use_knowledge else ()
        try:
            grounded = self.session.grounded(generation.question, preset=preset, history=history,
                                             use_knowledge=use_knowledge, max_tokens=self.settings.max_tokens)
        except KnowledgeError as err:
            failure = str(err)
            grounded = self.session.grounded(generation.question, preset=preset, history=history,
                                             use_knowledge=False, max_tokens=self.settings.max_tokens)
        self.post_message(self.Sourced(generation, grounded, failure, unchecked))
        return grounded

    @work(thread=True, group="generate")
    def generate(self, generation: Generation, history: list[dict], preset: str, use_knowledge: bool) -> None:
        engine = self.session.engine
        pending: list[str] = []
        last_flush = time.monotonic()
        error: BaseException | None = None
        grounded: Grounded | None = None
        try:
            grounded = self.ground(generation, history, preset, use_knowledge)
            for token in engine.answer(grounded.messages, stop=generation.stop, max_tokens=self.settings.max_tokens,
                                       temperature=self.settings.temperature):
                pending.append(token)
                if time.monotonic() - last_flush >= FLUSH_S:
                    self.post_message(self.Tokens(generation, "".join(pending), _copy(engine.last_stats)))
                    pending.clear()
                    last_flush = time.monotonic()
        except Exception as err:  # shown in the chat with its fix; the chat goes on
            error = err
        finally:
            stats = _copy(engine.last_stats) if grounded is not None else None  # else: the last answer's
            if pending:
                self.post_message(self.Tokens(generation, "".join(pending), stats))
            self.post_message(self.Done(generation, stats, error))

    def on_chat_screen_sourced(self, message: Sourced) -> None:
        gen, grounded = message.generation, message.grounded
        gen.sources, gen.searched = grounded.sources, grounded.searched
        if gen.view.is_attached:
            gen.view.set_sources(grounded.sources, nothing_found=grounded.nothing_found, unchecked=message.unchecked)
        if message.failure:
            self.notify(f"The stick's documents could not be searched: {message.failure}. This answer is the "
                        "model's alone.", title="Knowledge", severity="error", timeout=15, markup=False)

    def on_chat_screen_tokens(self, message: Tokens) -> None:
        if message.generation.view.is_attached:
            message.generation.view.append(message.text)
        if message.generation is self.generation:
            self.last_stats = message.stats
            self.refresh_stats()

    def on_chat_screen_done(self, message: Done) -> None:
        gen = message.generation
        stats, error = message.stats, message.error
        text = gen.view.text
        stopped = bool(stats and stats.stopped) or gen.stop.is_set()
        looped = bool(stats and stats.looped)
        if text.strip():
            gen.conversation.add("assistant", text, stopped=stopped or looped,
                                 sources=to_stored(gen.sources) if gen.searched else None)
            note = LOOP_NOTE if looped else "stopped" if stopped else ""
        else:  # nothing was written: take the question back so the model never sees it unanswered
            if gen.conversation.messages and gen.conversation.messages[-1]["role"] == "user":
                gen.conversation.messages.pop()
            note = "stopped before answering" if stopped else "no answer"
        if isinstance(error, EmptyAnswerError):
            if gen.view.is_attached:
                gen.view.append(f"*{error.sentence()}*")
        elif error is not None:
            what, _meaning, fix, _code = failure_parts(error)
            note = "failed"
            if gen.view.is_attached:
                gen.view.append(f"\n\n**The model stopped with an error:** {what}\n\n*What to do:* {fix}")
        if gen.view.is_attached:
            gen.view.finish(note)
        if isinstance(error, PoolLost) and gen is self.generation and self.app.alone_starter is not None:
            self.generation = None
            self.save(gen.conversation)
            self.app.go_on_alone(gen.conversation)
            return
        if gen is self.generation:
            self.generation = None
            self.last_stats = stats
            box = self.query_one("#question", QuestionBox)
            if not text.strip() and not box.text:
                box.text = gen.question  # ask again without retyping
            self.refresh_bindings()
            self.refresh_stats()
        self.save(gen.conversation)

    def action_stop(self) -> None:
        if self.generation is not None:
            self.generation.stop.set()
            self.refresh_stats("Stopping...")

    async def stop_and_wait(self) -> None:
        """Stop the answer being written and wait for its thread: before a restart closes the engine."""
        gen = self.generation
        if gen is not None:
            gen.stop.set()
            if gen.worker is not None:
                await gen.worker.wait()

    # ------------------------------------------------------------------ saving

    def save(self, conv: Conversation) -> None:
        if not conv.empty:
            self.save_worker(Conversation.from_dict(conv.to_dict()))

    @work(thread=True, group="save")
    def save_worker(self, conv: Conversation) -> None:
        try:
            self.history.save(conv)
        except OSError as err:  # the stick is full, read-only now, or was pulled out
            self.post_message(self.SaveFailed(f"{err.strerror or err}"))

    def on_chat_screen_save_failed(self, message: SaveFailed) -> None:
        self.save_error = message.why
        self.refresh_topbar()
        self.notify(f"The conversation could not be saved: {message.why}. It stays on screen until you quit.",
                    severity="error", timeout=10)

    # ------------------------------------------------------------------ conversations

    async def action_new(self) -> None:
        await self.stop_and_wait()
        self.open_conversation(self.fresh_conversation(self.conversation.preset_id))

    def open_conversation(self, conv: Conversation) -> None:
        self.conversation = conv
        self.last_stats = None
        transcript = self.query_one(Transcript)
        if conv.empty:
            transcript.reset()
        else:
            transcript.show(conv, self.speaker)
        self.refresh_topbar()
        self.refresh_stats()
        self.query_one("#question", QuestionBox).focus()

    # ------------------------------------------------------------------ other screens

    def action_help(self) -> None:
        self.app.push_screen(HelpScreen([
            ("In the chat", [*self.BINDINGS, *self.app.BINDINGS]),
            ("In the question box", QuestionBox.BINDINGS),
            ("Conversations (F4)", HistoryScreen.BINDINGS),
            ("Checking the stick (F6)", IntegrityScreen.BINDINGS),
            ("Copied answer, sources and exports", TextViewScreen.BINDINGS),
        ]))

    def action_presets(self) -> None:
        self.app.push_screen(PresetPicker(self.session.manifest.presets, self.conversation.preset_id),
                             self.preset_chosen)

    def preset_chosen(self, preset_id: str | None | bool) -> None:
        if preset_id is False:  # closed without choosing
            return
        self.conversation.preset_id = preset_id or None
        self.refresh_topbar()
        self.refresh_stats(f"Preset: {self.preset_name(self.conversation.preset_id)} "
                           "(applies from the next question)")

    def action_models(self) -> None:
        self.app.push_screen(ModelPicker(self.session), self.model_chosen)

    async def model_chosen(self, model_id: str | None) -> None:
        if not model_id or model_id == self.session.plan.model_id:
            return
        await self.stop_and_wait()
        self.save(self.conversation)
        self.app.switch_model(model_id, self.conversation)

    def action_history(self) -> None:
        self.app.push_screen(HistoryScreen(self.history, self.conversation, self.speaker,
                                           self.preset_name), self.history_closed)

    async def history_closed(self, result) -> None:
        if result is None:
            return
        if result.open is not None:
            await self.stop_and_wait()
            self.open_conversation(result.open)
        elif self.conversation.id in result.deleted:
            await self.stop_and_wait()
            self.open_conversation(self.fresh_conversation(self.conversation.preset_id))

    def action_hardware(self) -> None:
        self.app.push_screen(HardwareScreen(self.session))

    def action_integrity(self) -> None:
        self.app.push_screen(IntegrityScreen(self.session.bundle, self.session.manifest))

    def action_copy(self) -> None:
        answers = [m for m in self.conversation.messages if m["role"] == "assistant"]
        if not answers:
            self.refresh_stats("There is no answer to copy yet.")
            return
        text = answers[-1]["content"]
        if answers[-1].get("sources"):  # its [1], [2] mean something where it is pasted too
            text = f"{text.rstrip()}\n\nSources:\n{render_sources(from_stored(answers[-1]['sources']))}"
        self.app.copy_to_clipboard(text)
        self.app.push_screen(TextViewScreen(
            "The last answer", text, self.history,
            note="Sent to the clipboard (most terminals accept it). If pasting does not work, "
                 "select the text below with Shift+arrows and press Ctrl+C, or press Ctrl+S to save it "
                 "as a file on the stick."))


def _copy(stats: GenStats | None) -> GenStats | None:
    return replace(stats) if stats is not None else None
