"""The Textual chat driven by Pilot: every screen and key path, with FakeEngine and real kit objects.

Sessions are built from real dataclasses (Host, a LaunchPlan from kit.plan.make_plan, KernelChoice)
over a real tiny stick written here (files + bundle.json hashed with kit.integrity); only the
engine is the scriptable FakeEngine. The helpers are reused by tests/test_tui_snapshots.py.
"""

from __future__ import annotations

import io
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import FakeEngine
from rich.console import Console
from textual import events
from textual.app import App

from kit import integrity, launch, signing
from kit.conversation import LOOP_NOTE, EmptyAnswerError
from kit.errors import EngineError, IntegrityError, PlanError
from kit.ftsindex import write_index
from kit.ggufmeta import ModelFacts
from kit.grounding import NOTHING_FOUND
from kit.hardware import Host
from kit.history import HistoryStore, new_conversation
from kit.kernels import KernelChoice, ProbeResult
from kit.knowledge import Library
from kit.manifest import BundleManifest, FileEntry, KnowledgeEntry, ModelEntry, Preset
from kit.passages import cut_markdown
from kit.paths import find_bundle
from kit.plan import Overrides, make_plan
from kit.tui.app import make_app, pick_theme
from kit.tui.screens.chat import ChatScreen
from kit.tui.screens.failure import FailureScreen
from kit.tui.screens.start import StartScreen
from kit.tui.widgets.markdown_lines import MarkdownLines
from kit.tui.widgets.question import QuestionBox
from kit.tui.widgets.transcript import AnswerMessage, UserMessage

GiB = 1024**3

GEMMA = ModelFacts(
    architecture="gemma3", name="Gemma 3 270M", n_params=268_098_176, n_layers=18, n_embd=640, n_head=4,
    n_head_kv=1, key_length=256, value_length=256, n_ctx_train=32768, vocab_size=262_144,
    file_size=253_000_000, quant="Q4_K_M", size_label="270M", sliding_window=512,
    swa_layers=tuple(i % 6 != 5 for i in range(18)))
HUGE = ModelFacts(
    architecture="llama", name="Llama 70B", n_params=70_000_000_000, n_layers=80, n_embd=8192, n_head=64,
    n_head_kv=8, key_length=128, value_length=128, n_ctx_train=131_072, vocab_size=128_256,
    file_size=40_000_000_000, quant="Q4_K_M", size_label="70B")
HOST = Host(os="linux", arch="x86_64", cpu_name="Test CPU (4 cores)", cpu_flags=frozenset({"avx2", "fma"}),
            physical_cores=4, logical_cores=8, ram_total=16 * GiB, ram_available=8 * GiB)
KERNEL = KernelChoice("haswell", Path("/stick/KIT/runtimes/lib/libggml-cpu-haswell.so"), (
    ProbeResult("haswell", "ok", "", 276.0, 35.0, 1.25),
    ProbeResult("x64", "ok", "", 19.0, 12.0, 6.5),
    ProbeResult("sapphirerapids", "crashed", "SIGILL"),
), cached=True)
PRESETS = (
    Preset("general", "General", "You are a calm, careful assistant. Answer briefly."),
    Preset("first-aid", "First aid", "You help with first aid. Give short numbered steps."),
)


@pytest.fixture
def anyio_backend():
    return "asyncio"


# ---------------------------------------------------------------- a real tiny stick

# A knowledge source's documents: real Markdown, cut and indexed as `kit build` does (kit.passages,
# kit.ftsindex), so the chat's search, check and full text run on a real index.
KNOWLEDGE_ID, KNOWLEDGE_NAME = "survival-demo", "Survival demo"
KNOWLEDGE_DOCS = {
    "water.md": "# Water\n\n## Boiling\n\nBoiling is the surest way to purify water: bring it to a rolling boil "
                "for one minute, then let it cool, covered.\n\n## Chemical disinfection\n\nWhen you cannot boil "
                "it, use chlorine tablets as the label says.\n\n[bold]Shown as typed[/bold], never as markup.\n",
    "burns.md": "# Burns\n\n## Cooling a burn\n\nCool a burn under cool running water for twenty minutes. "
                "Do not use ice, butter or toothpaste.\n",
}


def add_knowledge(kit_dir: Path, docs: dict[str, str], files: list) -> KnowledgeEntry:
    """A `docs` knowledge source under KIT/knowledge/<id>/: the passage index and a licence text."""
    folder = kit_dir / "knowledge" / KNOWLEDGE_ID
    folder.mkdir(parents=True, exist_ok=True)
    passages = [p for name, text in docs.items() for p in cut_markdown(text, name, KNOWLEDGE_ID)]
    count = write_index(folder / "passages.sqlite", passages, {"source": KNOWLEDGE_ID})
    (folder / "LICENSE.txt").write_text("CC0-1.0: written for the tests.\n")
    rels = (f"knowledge/{KNOWLEDGE_ID}/passages.sqlite", f"knowledge/{KNOWLEDGE_ID}/LICENSE.txt")
    for rel in rels:
        digest = integrity.hash_file(kit_dir / rel, sha256=True)
        files.append(FileEntry(rel, digest.size, digest.blake3, digest.sha256))
    return KnowledgeEntry(KNOWLEDGE_ID, KNOWLEDGE_NAME, "docs", "CC0-1.0", "en", rels,
                          {"passages": count, "documents": len(docs)})


def add_zim(kit_dir: Path, files: list) -> KnowledgeEntry:
    """A `zim` knowledge source: a real Kiwix archive (tests/knowledgekit.py) under KIT/knowledge/first-aid/."""
    from knowledgekit import make_zim

    rel = "knowledge/first-aid/first-aid.zim"
    (kit_dir / rel).parent.mkdir(parents=True, exist_ok=True)
    make_zim(kit_dir / rel)
    digest = integrity.hash_file(kit_dir / rel, sha256=True)
    files.append(FileEntry(rel, digest.size, digest.blake3, digest.sha256))
    return KnowledgeEntry("first-aid", "First aid archive", "zim", "CC0-1.0", "en", (rel,),
                          {"articles": 3, "fulltext": True, "parts": 1})


def write_stick(root: Path, *, models=(("tiny", "Tiny Gemma", GEMMA, 3_000_000),
                                       ("huge", "Huge Llama", HUGE, 1000)),
                presets=PRESETS, knowledge: dict[str, str] | None = None, zim: bool = False) -> Path:
    """A stick with real files and a real bundle.json (each model file filled with its id);
    `knowledge`: documents (name -> Markdown) it carries as a `docs` source; `zim`: a Kiwix archive."""
    kit_dir = root / "KIT"
    files, entries = [], []
    for model_id, name, facts, size in models:
        rel = f"models/{model_id}/{model_id}.gguf"
        path = kit_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes((model_id.encode() * (size // len(model_id) + 1))[:size])
        digest = integrity.hash_file(path, sha256=True)
        files.append(FileEntry(rel, digest.size, digest.blake3, digest.sha256))
        entries.append(ModelEntry(model_id, name, (rel,), facts.quant, facts.n_params, facts.n_ctx_train,
                                  "test licence", "gemma", facts.to_dict()))
    sources = (add_knowledge(kit_dir, knowledge, files),) if knowledge else ()
    sources += (add_zim(kit_dir, files),) if zim else ()
    manifest = BundleManifest("0.1.0", "2025-01-01T00:00:00Z", "test", tuple(entries), (), tuple(files),
                              tuple(presets), knowledge=sources)
    (kit_dir / "bundle.json").write_bytes(manifest.to_json())
    return root


def make_session(stick: Path, *, state: Path | None, overrides: Overrides | None = None,
                 engine: FakeEngine | None = None, steps=()) -> launch.Session:
    bundle = find_bundle(stick)
    manifest = signing.check_stick(bundle).manifest
    overrides = overrides or Overrides()
    plan = make_plan(HOST, launch.model_options(manifest), cpu_variant=KERNEL.chosen, overrides=overrides)
    engine = engine or FakeEngine(model_id=plan.model_id, n_ctx=plan.n_ctx)
    return launch.Session(bundle, manifest, HOST, plan, KERNEL, engine, state, list(steps))


@dataclass
class FakeStarter:
    """starter(overrides, *, on_progress, on_status) -> Session, scripted."""

    stick: Path
    state: Path | None
    engine: FakeEngine = field(default_factory=FakeEngine)
    statuses: tuple[str, ...] = ("checking tiny against the stick's manifest", "probed CPU kernel haswell: ok")
    progress: tuple[integrity.Progress, ...] = (
        integrity.Progress("models/tiny/tiny.gguf", 1_500_000, 3_000_000, 1_500_000, 3_000_000, 50_000_000.0),)
    error: BaseException | None = None
    gate: threading.Event | None = None  # hold the start here until the test sets it
    calls: list[Overrides] = field(default_factory=list)

    def __call__(self, overrides: Overrides, *, on_progress, on_status) -> launch.Session:
        self.calls.append(overrides)
        for text in self.statuses:
            on_status(text)
        for p in self.progress:
            on_progress(p)
        if self.gate is not None:
            self.gate.wait(30)
        if self.error is not None:
            raise self.error
        self.engine.n_ctx = 2048
        return make_session(self.stick, state=self.state, overrides=overrides, engine=self.engine)


@pytest.fixture
def stick(tmp_path) -> Path:
    return write_stick(tmp_path / "stick")


@pytest.fixture
def knowledge_stick(tmp_path) -> Path:
    return write_stick(tmp_path / "kstick", knowledge=KNOWLEDGE_DOCS)


@pytest.fixture
def state(tmp_path) -> Path:
    path = tmp_path / "state"
    path.mkdir()
    return path


# ---------------------------------------------------------------- driving helpers

def screen_text(app) -> str:
    """The screen as plain text (what a person sees, without colours), trailing spaces removed."""
    console = Console(width=app.size.width, height=app.size.height, file=io.StringIO(), force_terminal=True,
                      color_system=None, record=True, legacy_windows=False, safe_box=False)
    console.print(app.screen._compositor.render_update(full=True, screen_stack=app._background_screens))
    lines = console.export_text(styles=False).splitlines()[: app.size.height]
    return "\n".join(line.rstrip() for line in lines)


async def wait_for(pilot, condition, *, timeout: float = 10.0, what: str = "condition") -> None:
    """Let the app run until condition() holds (workers are threads: a fixed pause is flaky)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        await pilot.pause(0.02)
        if condition():
            return
    raise AssertionError(f"timed out waiting for {what}\n{screen_text(pilot.app)}")


async def started(pilot) -> ChatScreen:
    await wait_for(pilot, lambda: isinstance(pilot.app.screen, ChatScreen), what="the chat")
    await pilot.pause()
    return pilot.app.screen


async def ask(pilot, question: str, *, key: str = "enter") -> None:
    box = pilot.app.screen.query_one("#question")
    await wait_for(pilot, lambda: box.has_focus, what="the question box to have focus")  # Enter goes there
    box.text = question
    await pilot.press(key)


def answers(chat) -> list[str]:
    return [a.text for a in chat.query(AnswerMessage)]


async def answered(pilot, n: int = 1) -> ChatScreen:
    chat = pilot.app.screen
    await wait_for(pilot, lambda: chat.generation is None and len(answers(chat)) >= n, what="an answer")
    await pilot.pause()
    return chat


# ---------------------------------------------------------------- start

@pytest.mark.anyio
async def test_start_shows_status_and_progress_then_chat(stick, state):
    gate = threading.Event()
    starter = FakeStarter(stick, state, gate=gate)
    app = make_app(starter=starter)
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for(pilot, lambda: "47.7 MiB/s" in screen_text(app), what="progress")
        text = screen_text(app)
        assert isinstance(app.screen, StartScreen)
        assert "probed CPU kernel haswell: ok" in text
        assert "models/tiny/tiny.gguf" in text
        assert "1.4 MiB of 2.9 MiB · 47.7 MiB/s · about 1 s left" in text
        assert "50%" in text
        gate.set()
        chat = await started(pilot)
        assert chat.session.plan.model_id == "tiny"
        assert "Tiny Gemma" in screen_text(app)
        assert starter.calls == [Overrides()]


@pytest.mark.anyio
async def test_integrity_error_becomes_failure_screen_not_a_traceback(stick, state):
    error = IntegrityError("model tiny is damaged: models/tiny/tiny.gguf is corrupt: contents differ "
                           "from the manifest (BLAKE3 mismatch)")
    app = make_app(starter=FakeStarter(stick, state, error=error))
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for(pilot, lambda: isinstance(app.screen, FailureScreen), what="the failure screen")
        await pilot.pause()
        text = " ".join(screen_text(app).split())
        assert "could not start" in text
        assert "models/tiny/tiny.gguf is corrupt" in text  # what file, what happened
        assert "damaged or was changed" in text  # what it means
        assert "kit verify" in text  # what to do: the error's hint
        assert "Traceback" not in text
        await pilot.press("q")
    assert app.return_code == IntegrityError.exit_code


@pytest.mark.anyio
async def test_failure_screen_shows_traceback_only_with_kit_debug(stick, state, monkeypatch):
    monkeypatch.setenv("KIT_DEBUG", "1")
    app = make_app(starter=FakeStarter(stick, state, error=EngineError("llama.cpp could not load tiny.gguf")))
    async with app.run_test(size=(100, 40)) as pilot:
        await wait_for(pilot, lambda: isinstance(app.screen, FailureScreen), what="the failure screen")
        await pilot.pause()
        assert "Traceback" in screen_text(app)


@pytest.mark.anyio
async def test_unexpected_error_is_explained_too(stick, state):
    app = make_app(starter=FakeStarter(stick, state, error=RuntimeError("boom")))
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for(pilot, lambda: isinstance(app.screen, FailureScreen), what="the failure screen")
        await pilot.pause()
        text = " ".join(screen_text(app).split())
        assert "unexpected error: RuntimeError: boom" in text and "KIT_DEBUG=1" in text
        await pilot.press("ctrl+q")
    assert app.return_code == 70


@pytest.mark.anyio
async def test_failure_retry_and_automatic_choice(stick, state):
    starter = FakeStarter(stick, state, error=PlanError("Huge Llama does not fit this host"))
    app = make_app(starter=starter, overrides=Overrides(model="huge"))
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for(pilot, lambda: isinstance(app.screen, FailureScreen), what="the failure screen")
        await pilot.press("r")
        await wait_for(pilot, lambda: len(starter.calls) == 2 and isinstance(app.screen, FailureScreen),
                       what="a second failure")
        assert starter.calls[1] == Overrides(model="huge")
        starter.error = None
        await pilot.press("a")  # let the kit choose: no overrides
        await started(pilot)
        assert starter.calls[2] == Overrides()


# ---------------------------------------------------------------- chat

@pytest.mark.anyio
async def test_streaming_answer_is_shown_and_saved(stick, state):
    starter = FakeStarter(stick, state)
    starter.engine.enqueue("Boil **water** for one minute.")
    app = make_app(starter=starter)
    async with app.run_test(size=(80, 24)) as pilot:
        await started(pilot)
        await ask(pilot, "How do I purify water?")
        chat = await answered(pilot)
        assert answers(chat) == ["Boil **water** for one minute."]
        text = screen_text(app)
        assert "How do I purify water?" in text
        assert "Boil water for one minute." in text  # Markdown rendered: no asterisks
        assert "tok/s" in text and "context" in text and "of 2048 tokens" in text
        # the preset from the stick's manifest went in as the system prompt
        prompt = starter.engine.prompts[0]
        assert prompt[0] == {"role": "system", "content": PRESETS[0].system}
        assert prompt[-1] == {"role": "user", "content": "How do I purify water?"}
        await wait_for(pilot, lambda: HistoryStore(state).list().conversations, what="the save")
        saved = HistoryStore(state).load(chat.conversation.id)
        assert [m["role"] for m in saved.messages] == ["user", "assistant"]
        assert saved.preset_id == "general" and saved.model_id == "tiny"


@pytest.mark.anyio
async def test_tokens_appear_while_streaming(stick, state):
    starter = FakeStarter(stick, state, engine=FakeEngine(delay=0.05))
    starter.engine.enqueue([f"word{i}" for i in range(200)])
    app = make_app(starter=starter)
    async with app.run_test(size=(80, 24)) as pilot:
        chat = await started(pilot)
        await ask(pilot, "Count")
        await wait_for(pilot, lambda: "word3" in screen_text(app), what="the first tokens")
        assert chat.generation is not None  # still answering: the text arrived in pieces
        assert "Answering" in screen_text(app)
        await pilot.press("escape")
        await answered(pilot)


@pytest.mark.anyio
async def test_long_answer_keeps_its_end_in_view(stick, state):
    starter = FakeStarter(stick, state)
    starter.engine.enqueue([f"line{i}\n\n" for i in range(60)] + ["THE-END"])
    app = make_app(starter=starter)
    async with app.run_test(size=(80, 24)) as pilot:
        await started(pilot)
        await ask(pilot, "Long")
        await answered(pilot)
        await wait_for(pilot, lambda: "THE-END" in screen_text(app), what="the end of the answer in view")
        assert "line0" not in screen_text(app)


@pytest.mark.anyio
async def test_enter_sends_and_ctrl_j_or_shift_enter_make_new_lines(stick, state):
    starter = FakeStarter(stick, state)
    starter.engine.enqueue("Two lines read.")
    app = make_app(starter=starter)
    async with app.run_test(size=(80, 24)) as pilot:
        chat = await started(pilot)
        box = chat.query_one("#question")
        await pilot.press("F", "i", "r", "e", "ctrl+j", "W", "a", "t", "e", "r")
        await pilot.press("shift+enter", "F", "o", "o", "d")
        await pilot.pause()
        assert box.text == "Fire\nWater\nFood" and chat.generation is None  # nothing sent yet
        assert starter.engine.prompts == []
        await pilot.press("enter")
        await answered(pilot)
        assert starter.engine.prompts[0][-1] == {"role": "user", "content": "Fire\nWater\nFood"}
        assert box.text == "" and "Two lines read." in screen_text(app)


@pytest.mark.anyio
async def test_keys_typed_faster_than_the_box_reads_them_keep_their_order(stick, state):
    # A terminal delivers a burst of keys at once (fast typing, a slow host): the new line and
    # the send must land after the letters typed before them.
    starter = FakeStarter(stick, state)
    starter.engine.enqueue("In order.")
    app = make_app(starter=starter)
    async with app.run_test(size=(80, 24)) as pilot:
        await started(pilot)
        burst = [*"How", "ctrl+j", *"Now", "enter"]
        for key in burst:
            app.post_message(events.Key(key, key if len(key) == 1 else None))
        await answered(pilot)
        assert starter.engine.prompts[0][-1] == {"role": "user", "content": "How\nNow"}


@pytest.mark.anyio
async def test_enter_on_an_empty_box_sends_nothing_and_says_what_to_do(stick, state):
    starter = FakeStarter(stick, state)
    app = make_app(starter=starter)
    async with app.run_test(size=(80, 24)) as pilot:
        chat = await started(pilot)
        await pilot.press("enter")
        await pilot.pause()
        assert starter.engine.prompts == [] and chat.generation is None
        assert "Type a question first, then press Enter." in screen_text(app)
        assert "Enter sends" in screen_text(app)  # the box says how to send


@pytest.mark.anyio
async def test_second_question_carries_the_history(stick, state):
    starter = FakeStarter(stick, state)
    starter.engine.enqueue("First answer.", "Second answer.")
    app = make_app(starter=starter)
    async with app.run_test(size=(80, 24)) as pilot:
        await started(pilot)
        await ask(pilot, "One?")
        await answered(pilot)
        await ask(pilot, "Two?", key="ctrl+s")  # the other send key, from anywhere in the chat
        await answered(pilot, 2)
        roles = [(m["role"], m["content"]) for m in starter.engine.prompts[1]]
        assert roles[1:] == [("user", "One?"), ("assistant", "First answer."), ("user", "Two?")]


@pytest.mark.anyio
async def test_escape_stops_mid_answer_and_the_chat_goes_on(stick, state):
    starter = FakeStarter(stick, state, engine=FakeEngine(delay=0.05))
    starter.engine.enqueue([f"w{i}" for i in range(400)], "After stop.")
    app = make_app(starter=starter)
    async with app.run_test(size=(80, 24)) as pilot:
        chat = await started(pilot)
        await ask(pilot, "Talk for a long time")
        await wait_for(pilot, lambda: "w2" in answers(chat)[0], what="the first tokens")
        await pilot.press("escape")
        await answered(pilot)
        assert isinstance(app.screen, ChatScreen)  # Esc stopped the answer, not the chat
        assert starter.engine.last_stats.stopped
        partial = answers(chat)[0]
        assert 0 < len(partial.split()) < 400
        assert chat.conversation.messages[-1] == {"role": "assistant", "content": partial, "stopped": True}
        assert "Stopped" in screen_text(app)
        await ask(pilot, "Next")
        await answered(pilot, 2)
        assert answers(chat)[1] == "After stop."


@pytest.mark.anyio
async def test_empty_question_is_not_sent(stick, state):
    starter = FakeStarter(stick, state)
    app = make_app(starter=starter)
    async with app.run_test(size=(80, 24)) as pilot:
        await started(pilot)
        await ask(pilot, "   \n ")
        await pilot.pause()
        assert starter.engine.prompts == []
        assert "Type a question first" in screen_text(app)


@pytest.mark.anyio
async def test_engine_error_is_shown_in_the_chat_and_question_kept(stick, state):
    starter = FakeStarter(stick, state)
    starter.engine.enqueue(EngineError("the conversation no longer fits the context",
                                       "start a new conversation (the context is full)"))
    app = make_app(starter=starter)
    async with app.run_test(size=(80, 24)) as pilot:
        chat = await started(pilot)
        await ask(pilot, "A long question")
        await answered(pilot)
        await wait_for(pilot, lambda: "start a new conversation" in " ".join(screen_text(app).split()),
                       what="the error and its fix")
        assert "no longer fits the context" in answers(chat)[0]
        assert chat.conversation.messages == []  # never sent to the model unanswered next time
        assert chat.query_one("#question").text == "A long question"


@pytest.mark.anyio
async def test_empty_answer_says_what_to_try_and_keeps_the_question(stick, state):
    starter = FakeStarter(stick, state)
    starter.engine.enqueue([])  # the model ended its answer at once
    app = make_app(starter=starter)
    async with app.run_test(size=(100, 30)) as pilot:
        chat = await started(pilot)
        await ask(pilot, "Write a long story about a river and a village.")
        await answered(pilot)
        sentence = EmptyAnswerError().sentence()
        assert sentence == ("The model gave no answer: rephrase the question, or try another preset "
                            "or another model.")
        assert sentence in answers(chat)[0]
        await wait_for(pilot, lambda: "The model gave no answer: rephrase the question" in screen_text(app),
                       what="the sentence on screen")
        assert "no answer" in screen_text(app)  # the answer's border says how it ended
        assert chat.conversation.messages == []  # never sent to the model unanswered next time
        assert chat.query_one("#question").text == "Write a long story about a river and a village."


@pytest.mark.anyio
async def test_a_looping_answer_is_stopped_and_what_came_before_kept(stick, state):
    starter = FakeStarter(stick, state)
    starter.engine.enqueue(["Stay calm.\n\n"] + ["I will not let you down.\n\n"] * 300)
    app = make_app(starter=starter)
    async with app.run_test(size=(100, 30)) as pilot:
        chat = await started(pilot)
        await ask(pilot, "Write a poem about the rain.")
        await answered(pilot)
        kept = "Stay calm.\n\n I will not let you down.\n\n"
        assert answers(chat)[0] == kept
        stats = starter.engine.last_stats
        assert stats.looped and not stats.stopped
        assert stats.completion_tokens < 10  # the engine stopped generating, not at 300
        text = screen_text(app)
        assert LOOP_NOTE in text  # on the answer's border
        assert "Stopped: the model was repeating itself ·" in text  # and in the status line
        assert chat.conversation.messages[-1] == {"role": "assistant", "content": kept, "stopped": True}


MARKDOWN = ("# Water\n\nBoil it for **one minute**; at altitude, *three*.\n\n"
            + "".join(f"{i}. Step {i}: {'keep it covered ' * (i % 3)}and wait.\n" for i in range(1, 31))
            + "\n| Method | Time |\n|---|---|\n| Boil | 1 min |\n| Tablets | 30 min |\n\n"
            + "```python\n" + "".join(f"x{i} = {i}  # line {i}\n" for i in range(40)) + "```\n\n"
            + "- a bullet\n  - nested under it\n- another\n\n" + "A last paragraph that is long enough "
            * 6 + "to wrap.\n")


class _Pair(App):
    """One answer streamed in pieces beside the same text given whole."""

    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def compose(self):
        yield MarkdownLines(id="streamed")
        yield MarkdownLines(self.text, id="whole")


def _lines(widget: MarkdownLines) -> list[str]:
    return [widget.render_line(y).text.rstrip() for y in range(widget.size.height)]


@pytest.mark.anyio
async def test_streamed_markdown_shows_what_the_whole_text_shows():
    app = _Pair(MARKDOWN)
    async with app.run_test(size=(90, 30)) as pilot:
        streamed, whole = app.query_one("#streamed", MarkdownLines), app.query_one("#whole", MarkdownLines)
        for i in range(0, len(MARKDOWN), 7):
            streamed.append(MARKDOWN[i:i + 7])
            if i % 140 == 0:
                await pilot.pause()  # frames in between, as in the chat
        streamed.finish()
        await pilot.pause()
        assert streamed.text == MARKDOWN
        shown = _lines(streamed)
        assert shown == _lines(whole)
        page = "\n".join(shown)
        assert "Boil it for one minute; at altitude, three." in page  # emphasis rendered, no asterisks
        assert " 1. Step 1: keep it covered and wait." in page and "30. Step 30:" in page
        assert "Tablets" in page and "30 min" in page and "|---|" not in page  # a table, drawn
        assert "x39 = 39  # line 39" in page and "```" not in page  # the whole code block, no fences
        assert "• a bullet" in page and "• nested under it" in page


@pytest.mark.anyio
async def test_streaming_work_per_piece_does_not_grow_with_the_answer(monkeypatch):
    """Every piece re-renders only the block being written: the same work at the start of a
    2,000-piece answer as at its end (counted, not timed)."""
    renders: list[int] = []
    original = MarkdownLines._render_block
    monkeypatch.setattr(MarkdownLines, "_render_block",
                        lambda self, block: renders.append(len(block.source)) or original(self, block))
    pieces = (MARKDOWN * 4).replace("\n", " \n").split(" ")
    pieces = [p + " " for p in pieces][:2000]
    app = _Pair("")
    async with app.run_test(size=(90, 30)):
        streamed = app.query_one("#streamed", MarkdownLines)
        per_piece = []
        for piece in pieces:
            renders.clear()
            streamed.append(piece)
            streamed.get_content_height(app.size, app.size, 88)  # what a frame does
            per_piece.append((len(renders), sum(renders)))
    early, late = per_piece[10:200], per_piece[-190:]
    assert max(n for n, _ in early + late) <= 3  # blocks rendered: the live one, and one just finished
    biggest_block = max(len(b) for b in ("\n".join(f"x{i} = {i}  # line {i}" for i in range(16)),
                                         "A last paragraph that is long enough " * 6 + "to wrap."))
    assert max(chars for _, chars in late) <= 2 * biggest_block + 200  # never the answer so far


@pytest.mark.anyio
async def test_a_long_conversation_does_not_rerender_earlier_answers(stick, state, monkeypatch):
    starter = FakeStarter(stick, state)
    starter.engine.enqueue(*[f"Answer {i}: boil the water, then let it cool." for i in range(12)])
    starter.engine.enqueue([f"word{i}" for i in range(300)])
    app = make_app(starter=starter)
    async with app.run_test(size=(80, 24)) as pilot:
        chat = await started(pilot)
        for i in range(12):
            await ask(pilot, f"Question {i}?")
            await answered(pilot, i + 1)
        earlier = set(chat.query(MarkdownLines))
        rendered: list[MarkdownLines] = []
        original = MarkdownLines._render_block
        monkeypatch.setattr(MarkdownLines, "_render_block",
                            lambda self, block: rendered.append(self) or original(self, block))
        await ask(pilot, "And now a long one?")
        await answered(pilot, 13)
        assert rendered and not earlier & set(rendered)  # only the new answer was rendered
        assert "word299" in answers(chat)[-1]


@pytest.mark.anyio
async def test_new_conversation(stick, state):
    starter = FakeStarter(stick, state)
    starter.engine.enqueue("An answer.")
    app = make_app(starter=starter)
    async with app.run_test(size=(80, 24)) as pilot:
        chat = await started(pilot)
        await ask(pilot, "First")
        await answered(pilot)
        first_id = chat.conversation.id
        await pilot.press("ctrl+n")
        await pilot.pause()
        assert chat.conversation.id != first_id and chat.conversation.empty
        assert not chat.query(AnswerMessage) and not chat.query(UserMessage)
        assert chat.conversation.preset_id == "general"  # the preset stays


@pytest.mark.anyio
async def test_new_conversation_while_answering_stops_first(stick, state):
    starter = FakeStarter(stick, state, engine=FakeEngine(delay=0.05))
    starter.engine.enqueue([f"w{i}" for i in range(400)])
    app = make_app(starter=starter)
    async with app.run_test(size=(80, 24)) as pilot:
        chat = await started(pilot)
        await ask(pilot, "Long")
        await wait_for(pilot, lambda: chat.query(AnswerMessage) and "w1" in answers(chat)[0], what="tokens")
        await pilot.press("ctrl+n")
        await wait_for(pilot, lambda: chat.generation is None, what="the stop")
        assert chat.conversation.empty
        assert starter.engine.last_stats.stopped


@pytest.mark.anyio
async def test_preset_picker(stick, state):
    starter = FakeStarter(stick, state)
    starter.engine.enqueue("1. Press on the wound.", "Plain.")
    app = make_app(starter=starter)
    async with app.run_test(size=(80, 24)) as pilot:
        chat = await started(pilot)
        await pilot.press("f2")
        await pilot.pause()
        text = screen_text(app)
        assert "First aid" in text and "General" in text and "No preset" in text
        await pilot.press("down", "enter")  # General -> First aid
        await pilot.pause()
        assert chat.conversation.preset_id == "first-aid"
        assert "preset: First aid" in screen_text(app)
        await ask(pilot, "Bleeding")
        await answered(pilot)
        assert starter.engine.prompts[0][0]["content"] == PRESETS[1].system
        await pilot.press("ctrl+p", "down", "enter")  # -> No preset
        await pilot.pause()
        assert chat.conversation.preset_id is None
        await ask(pilot, "Plain?")
        await answered(pilot, 2)
        assert all(m["role"] != "system" for m in starter.engine.prompts[1])
        await pilot.press("f2", "escape")  # closing without choosing changes nothing
        await pilot.pause()
        assert chat.conversation.preset_id is None and isinstance(app.screen, ChatScreen)


@pytest.mark.anyio
async def test_model_picker_shows_verdicts_and_restarts_with_the_choice(stick, state):
    starter = FakeStarter(stick, state)
    starter.engine.enqueue("Answer from tiny.")
    app = make_app(starter=starter)
    async with app.run_test(size=(100, 30)) as pilot:
        chat = await started(pilot)
        await ask(pilot, "Hello")
        await answered(pilot)
        conv_id = chat.conversation.id
        await pilot.press("f3")
        await pilot.pause()
        text = " ".join(screen_text(app).split())
        assert "Tiny Gemma · 2.9 MiB · in use" in text
        assert "Huge Llama · 1000 B · does not fit" in text
        assert "Huge Llama skipped: needs" in text  # the plan's own reason
        await pilot.press("escape")
        await pilot.pause()
        assert len(starter.calls) == 1
        # choose the other model: the kit restarts with Overrides(model=...), keeping the conversation
        starter.error = PlanError("Huge Llama does not fit this host: needs 40 GiB")
        await pilot.press("ctrl+l", "down", "enter")
        await wait_for(pilot, lambda: isinstance(app.screen, FailureScreen), what="the failure screen")
        assert starter.calls[-1] == Overrides(model="huge")
        starter.error = None
        await pilot.press("a")
        chat = await started(pilot)
        assert starter.calls[-1] == Overrides()
        assert chat.conversation.id == conv_id and "Answer from tiny." in screen_text(app)


@pytest.mark.anyio
async def test_hardware_screen_shows_what_doctor_shows(stick, state):
    app = make_app(starter=FakeStarter(stick, state))
    async with app.run_test(size=(120, 40)) as pilot:
        await started(pilot)
        await pilot.press("f5")
        await pilot.pause()
        text = screen_text(app)
        assert "Host: linux-x86_64, Test CPU (4 cores)" in text
        assert "haswell" in text and "sapphirerapids" in text and "crashed" in text
        assert "Plan: model tiny" in text
        assert str(state) in text
        await pilot.press("escape")
        await pilot.pause()
        assert isinstance(app.screen, ChatScreen)


@pytest.mark.anyio
async def test_help_lists_every_chat_key(stick, state):
    app = make_app(starter=FakeStarter(stick, state))
    async with app.run_test(size=(120, 50)) as pilot:
        chat = await started(pilot)
        await pilot.press("f1")
        await pilot.pause()
        text = screen_text(app)
        from kit.tui.text import key_label

        for binding in [*chat.BINDINGS, *QuestionBox.BINDINGS]:
            assert key_label(binding.key) in text, binding.key
        assert "Ctrl+Q" in text and "Ctrl+S" in text and "Esc" in text
        assert "Enter" in text and "Ctrl+J / Shift+Enter / Alt+Enter" in text and "A new line" in text
        await pilot.press("escape")
        await pilot.press("ctrl+g")
        await pilot.pause()
        assert "Keys" in screen_text(app)


@pytest.mark.anyio
async def test_integrity_screen_verifies_every_file(stick, state):
    app = make_app(starter=FakeStarter(stick, state))
    async with app.run_test(size=(100, 30)) as pilot:
        await started(pilot)
        await pilot.press("f6")
        await wait_for(pilot, lambda: "The stick is intact" in screen_text(app), what="the verdict")
        text = screen_text(app)
        assert "OK" in text and "models/tiny/tiny.gguf" in text and "models/huge/huge.gguf" in text
        await pilot.press("escape")
        # damage one file, add a stray one: the next check names both
        tiny = stick / "KIT/models/tiny/tiny.gguf"
        data = bytearray(tiny.read_bytes())
        data[100] ^= 0xFF
        tiny.write_bytes(bytes(data))
        (stick / "KIT/stray.txt").write_text("hello")
        await pilot.press("ctrl+f")
        await wait_for(pilot, lambda: "The stick is damaged" in screen_text(app), what="the verdict")
        text = screen_text(app)
        assert "CORRUPT" in text and "BLAKE3 mismatch" in text
        assert "UNEXPECTED" in text and "stray.txt" in text
        assert "1 ok, 1 corrupt, 0 missing, 1 unexpected" in text


@pytest.mark.anyio
async def test_copy_answer_uses_clipboard_and_shows_it_to_save(stick, state):
    starter = FakeStarter(stick, state)
    starter.engine.enqueue("Keep warm and dry.")
    app = make_app(starter=starter)
    async with app.run_test(size=(80, 24)) as pilot:
        await started(pilot)
        await pilot.press("f7")
        await pilot.pause()
        assert "no answer to copy" in screen_text(app)
        await ask(pilot, "Cold?")
        await answered(pilot)
        await pilot.press("ctrl+r")
        await pilot.pause()
        assert app.clipboard == "Keep warm and dry."
        assert "Keep warm and dry." in screen_text(app)
        await pilot.press("ctrl+s")
        exports = state / "exports"
        await wait_for(pilot, lambda: exports.exists() and list(exports.glob("*.md")), what="the saved answer")
        assert list(exports.glob("*.md"))[0].read_text() == "Keep warm and dry."


# ---------------------------------------------------------------- history

@pytest.mark.anyio
async def test_history_list_reopen_delete_export(stick, state):
    store = HistoryStore(state)
    old = new_conversation("tiny", "first-aid")
    old.add("user", "How to treat a burn?")
    old.add("assistant", "Cool it under running water for 20 minutes.")
    store.save(old)
    starter = FakeStarter(stick, state)
    starter.engine.enqueue("Fresh answer.")
    app = make_app(starter=starter)
    async with app.run_test(size=(100, 30)) as pilot:
        chat = await started(pilot)
        await ask(pilot, "Where is north?")
        await answered(pilot)
        await wait_for(pilot, lambda: len(store.list().conversations) == 2, what="the save")
        await pilot.press("f4")
        await wait_for(pilot, lambda: "How to treat a burn?" in screen_text(app), what="the list")
        assert "Where is north?" in screen_text(app)
        # export the older one (second in the list, newest first)
        await pilot.press("down", "e")
        export = state / "exports" / f"{old.id}.md"
        await wait_for(pilot, export.exists, what="the export")
        md = export.read_text()
        assert md.startswith("# How to treat a burn?")
        assert "## You\n\nHow to treat a burn?" in md and "## Tiny Gemma\n\nCool it" in md
        assert "- Preset: First aid" in md
        # reopen it
        await pilot.press("enter")
        await wait_for(pilot, lambda: isinstance(app.screen, ChatScreen), what="the chat")
        assert chat.conversation.id == old.id
        assert "Cool it under running water" in screen_text(app)
        assert chat.conversation.preset_id == "first-aid"
        # delete it, after a "no" and a "yes"
        await pilot.press("ctrl+o")
        await wait_for(pilot, lambda: "How to treat a burn?" in screen_text(app), what="the list")
        assert app.screen.selected_id() == old.id  # the list starts on the open conversation
        await pilot.press("d")
        await pilot.pause()
        assert "cannot be undone" in screen_text(app)
        await pilot.press("n")
        await pilot.pause()
        assert len(store.list().conversations) == 2
        await pilot.press("d", "y")
        await wait_for(pilot, lambda: len(store.list().conversations) == 1, what="the delete")
        await wait_for(pilot, lambda: "How to treat a burn?" not in screen_text(app), what="the new list")
        await pilot.press("escape")
        await pilot.pause()
        assert chat.conversation.id != old.id and chat.conversation.empty  # the open one was deleted


@pytest.mark.anyio
async def test_history_skips_unreadable_files(stick, state):
    (state / "history").mkdir()
    (state / "history" / "20250101-000000-deadbeef.json").write_text("{not json")
    app = make_app(starter=FakeStarter(stick, state))
    async with app.run_test(size=(100, 30)) as pilot:
        await started(pilot)
        await pilot.press("f4")
        await wait_for(pilot, lambda: "could not be read" in screen_text(app), what="the note")
        assert "No conversations yet" in screen_text(app)


@pytest.mark.anyio
async def test_read_only_stick_keeps_history_in_memory_with_a_banner(stick):
    starter = FakeStarter(stick, None)
    starter.engine.enqueue("In memory.")
    app = make_app(starter=starter)
    async with app.run_test(size=(80, 24)) as pilot:
        chat = await started(pilot)
        assert "Read-only stick" in screen_text(app) and "not saved" in screen_text(app)
        await ask(pilot, "Remember me")
        await answered(pilot)
        await pilot.press("ctrl+n", "f4")
        await wait_for(pilot, lambda: "Remember me" in screen_text(app), what="the list")
        assert "read-only" in screen_text(app)
        await pilot.press("e")  # nowhere to write: the export is shown to copy by hand
        await wait_for(pilot, lambda: "## You" in screen_text(app), what="the export view")
        assert "# Remember me" in screen_text(app)
        await pilot.press("escape", "enter")
        await wait_for(pilot, lambda: isinstance(app.screen, ChatScreen), what="the chat")
        assert chat.conversation.messages[0]["content"] == "Remember me"
    assert not (stick / "KIT" / "state").exists()


@pytest.mark.anyio
async def test_quit_while_answering_ends_promptly(stick, state):
    starter = FakeStarter(stick, state, engine=FakeEngine(delay=0.05))
    starter.engine.enqueue([f"w{i}" for i in range(2000)])
    app = make_app(starter=starter)
    async with app.run_test(size=(80, 24)) as pilot:
        chat = await started(pilot)
        await ask(pilot, "Long")
        await wait_for(pilot, lambda: chat.query(AnswerMessage) and "w1" in answers(chat)[0], what="tokens")
        await pilot.press("ctrl+q")
        stats = starter.engine.last_stats
    # the thread sees the stop at its next token, long before the 2000 tokens are done
    deadline = time.monotonic() + 5
    while not stats.stopped and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stats.stopped and stats.completion_tokens < 200


# ---------------------------------------------------------------- pure helpers of the shell

def test_pick_theme_uses_terminal_colours_where_truecolor_is_unlikely():
    assert pick_theme({"TERM": "linux"}) == "ansi-dark"
    assert pick_theme({"TERM": "xterm"}) == "ansi-dark"
    assert pick_theme({"TERM": "xterm-256color"}) is None
    assert pick_theme({"TERM": "xterm", "COLORTERM": "truecolor"}) is None


def test_texts():
    from kit.tui.text import duration, human_bytes, key_label, progress_bar, progress_details

    assert human_bytes(253_000_000) == "241.3 MiB" and human_bytes(999) == "999 B"
    assert human_bytes(1.6 * 2**30) == "1.6 GiB" and human_bytes(2048) == "2.0 KiB"
    assert duration(5) == "5 s" and duration(125) == "2 min 5 s" and duration(0.42) == "0.4 s"
    assert progress_bar(0.5, 10) == "█████░░░░░"
    assert key_label("f1,ctrl+g") == "F1 / Ctrl+G" and key_label("escape") == "Esc"
    p = integrity.Progress("a", 10, 100, 50_000_000, 150_000_000, 25_000_000.0)
    assert progress_details(p) == "47.7 MiB of 143.1 MiB · 23.8 MiB/s · about 4 s left"


@pytest.mark.anyio
async def test_no_color_and_plain_console_still_render(stick, state, monkeypatch):
    monkeypatch.setenv("NO_COLOR", "1")
    starter = FakeStarter(stick, state)
    starter.engine.enqueue("Plain.")
    app = make_app(starter=starter, theme="ansi-dark")
    async with app.run_test(size=(80, 24)) as pilot:
        assert app.no_color
        await started(pilot)
        await ask(pilot, "Hi")
        await answered(pilot)
        assert "Plain." in screen_text(app)
        await pilot.press("f2")
        await pilot.pause()
        assert "First aid" in screen_text(app)


def test_session_messages_and_report_come_from_the_stick(stick, state):
    session = make_session(stick, state=state)
    assert session.model.name == "Tiny Gemma"
    assert {v.model_id: v.fits for v in session.plan.verdicts} == {"tiny": True, "huge": False}
    earlier = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    msgs = session.messages("Hi", preset="general", history=earlier)
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
    assert msgs[0]["content"] == session.manifest.presets[0].system and msgs[-1]["content"] == "Hi"
    with pytest.raises(PlanError, match="no preset 'nope'") as err:
        session.messages("Hi", preset="nope")
    assert "general" in err.value.hint
    report = session.report()
    assert report.plan is session.plan and report.kernel is session.kernel
    assert [m["id"] for m in report.to_dict()["models"]] == ["tiny", "huge"]


@pytest.mark.anyio
async def test_a_lost_pool_worker_restarts_the_chat_without_the_pool_keeping_the_conversation(stick, state):
    from kit.errors import PoolLost

    pooled, alone = FakeStarter(stick, state), FakeStarter(stick, state)
    pooled.engine.enqueue("Boil water first.", PoolLost("pool worker 10.0.0.2:50052 stopped answering; the "
                                                        "answer in progress has ended"))
    alone.engine.enqueue("Then let it cool.")
    app = make_app(starter=pooled, alone_starter=alone)
    async with app.run_test(size=(100, 30)) as pilot:
        await started(pilot)
        await ask(pilot, "How do I purify water?")
        await answered(pilot)
        await ask(pilot, "And then?")
        await wait_for(pilot, lambda: alone.calls and isinstance(app.screen, ChatScreen) and app.starter is alone,
                       what="the chat started again without the pool")
        chat = await started(pilot)
        assert [m["content"] for m in chat.conversation.messages][:2] == ["How do I purify water?",
                                                                          "Boil water first."]
        await ask(pilot, "And then?")
        await answered(pilot, 2)
        assert "Then let it cool." in answers(chat)[-1]
        assert alone.engine.prompts[0][-1] == {"role": "user", "content": "And then?"}


# ---------------------------------------------------------------- knowledge

def words(app) -> str:
    """The screen's words in one line: wrapped lines joined, borders dropped."""
    return " ".join(screen_text(app).translate({ord(c): " " for c in "│║"}).split())


def has_sources_block(prompt: list[dict]) -> bool:
    return prompt[-1]["content"].startswith("Sources:")


async def knowledge_ready(pilot) -> ChatScreen:
    chat = await started(pilot)
    await wait_for(pilot, lambda: "knowledge: on (1 source)" in screen_text(pilot.app), what="the check")
    return chat


@pytest.mark.anyio
async def test_an_answer_shows_its_sources_and_the_sources_key_opens_one(knowledge_stick, state):
    starter = FakeStarter(knowledge_stick, state)
    starter.engine.enqueue("Bring it to a rolling boil for one minute [1].")
    app = make_app(starter=starter)
    async with app.run_test(size=(100, 30)) as pilot:
        chat = await knowledge_ready(pilot)
        await wait_for(pilot, lambda: "F8 or Ctrl+E" in screen_text(app), what="the welcome saying how")
        await ask(pilot, "How do I purify water by boiling?")
        await answered(pilot)
        # the model was given the passage, numbered; the question's message carries it
        prompt = starter.engine.prompts[0]
        assert has_sources_block(prompt) and "[1] Water — Boiling\nBoiling is the surest way" in prompt[-1]["content"]
        assert prompt[-1]["content"].endswith("Question: How do I purify water by boiling?")
        text = screen_text(app)
        assert "Sources (* = cited in the answer; F8 opens one):" in text
        assert "* [1] Water — Boiling (survival-demo: water.md)" in text
        view = chat.query(AnswerMessage).last()
        assert view.cited == {1} and view.sources[0].section == "Boiling"
        # kept with the conversation (what a citation needs), never sent to the model again
        assert chat.conversation.messages[-1]["sources"][0] == {
            "source": "survival-demo", "path": "water.md", "title": "Water", "section": "Boiling"}
        assert chat.conversation.prompt_history()[-1] == {"role": "assistant", "content": answers(chat)[0]}
        # F8: the sources, then the whole document, as plain text
        await pilot.press("f8")
        await wait_for(pilot, lambda: "The last answer's sources" in screen_text(app), what="the picker")
        assert "* [1] Water — Boiling (survival-demo: water.md)" in screen_text(app)
        await pilot.press("enter")
        await wait_for(pilot, lambda: "Chemical disinfection" in screen_text(app), what="the document")
        assert "[bold]Shown as typed[/bold], never as markup." in screen_text(app)  # markup untouched
        text = words(app)
        assert "From survival-demo: water.md" in text
        assert "Boiling is the surest way" in text and "Chemical disinfection" in text
        await pilot.press("ctrl+s")  # saved as a source, beside the answers one copies
        await wait_for(pilot, lambda: list((state / "exports").glob("*-source.md")), what="the saved source")
        await pilot.press("escape")
        await wait_for(pilot, lambda: isinstance(app.screen, ChatScreen), what="the chat")
        await pilot.press("ctrl+e", "escape")  # the other key; Esc closes the picker
        await wait_for(pilot, lambda: isinstance(app.screen, ChatScreen), what="the chat")
        # a copied answer takes its sources along: its [1] means something where it is pasted
        await pilot.press("f7")
        await wait_for(pilot, lambda: "The last answer" in screen_text(app), what="the copy")
        assert app.screen.text == ("Bring it to a rolling boil for one minute [1].\n\nSources:\n"
                                   "[1] Water — Boiling (survival-demo: water.md)\n"
                                   "[2] Water — Chemical disinfection (survival-demo: water.md)")
        library = chat.session.knowledge
    assert library.search("boiling water") == []  # the app's end closed the library


@pytest.mark.anyio
async def test_a_zim_article_is_cited_and_opened_as_plain_text(tmp_path, state):
    """A Kiwix archive's article: its best section is the source, F8 opens the whole article as
    text (the archive's script never runs or shows), the climbing entry is never listed."""
    starter = FakeStarter(write_stick(tmp_path / "zstick", zim=True), state)
    starter.engine.enqueue("Wrap them in dry blankets [1].")
    app = make_app(starter=starter)
    async with app.run_test(size=(100, 30)) as pilot:
        await started(pilot)
        await wait_for(pilot, lambda: "knowledge: on (1 source)" in screen_text(app), what="the check")
        await ask(pilot, "How do I treat hypothermia? rewarming")
        await answered(pilot)
        assert "[1] Hypothermia — Rewarming\nMove the person" in starter.engine.prompts[0][-1]["content"]
        assert "* [1] Hypothermia — Rewarming (first-aid: Hypothermia)" in screen_text(app)
        assert ".." not in screen_text(app)
        await pilot.press("f8")
        await wait_for(pilot, lambda: "The last answer's sources" in screen_text(app), what="the picker")
        await pilot.press("enter")
        await wait_for(pilot, lambda: "Shivering, confusion" in words(app), what="the article")
        text = words(app)
        assert "Signs" in text and "Rewarming" in text and "From first-aid: Hypothermia" in text
        assert "PWNED" not in text and "<p>" not in text


@pytest.mark.anyio
async def test_the_toggle_turns_knowledge_off_and_nothing_found_is_said(knowledge_stick, state):
    starter = FakeStarter(knowledge_stick, state)
    starter.engine.enqueue("Boil it.", "Ulaanbaatar [1].", "Boil it again.")
    app = make_app(starter=starter)
    async with app.run_test(size=(100, 30)) as pilot:
        chat = await knowledge_ready(pilot)
        await pilot.press("f9")
        await wait_for(pilot, lambda: "knowledge: off" in screen_text(app), what="the top bar")
        assert "Knowledge off: answers come from the model alone" in screen_text(app)
        await ask(pilot, "How do I purify water by boiling?")
        await answered(pilot)
        assert starter.engine.prompts[0][-1] == {"role": "user", "content": "How do I purify water by boiling?"}
        assert "Sources (" not in screen_text(app) and NOTHING_FOUND[:20] not in words(app)
        assert "sources" not in chat.conversation.messages[-1]  # no search was made
        await pilot.press("f8")  # the last answer has none to open
        await wait_for(pilot, lambda: "The last answer has no sources to open." in screen_text(app), what="note")
        # on again, in a new conversation: a question no document covers
        await pilot.press("ctrl+k", "ctrl+n")
        await wait_for(pilot, lambda: "knowledge: on (1 source)" in screen_text(app), what="the top bar")
        await ask(pilot, "What is the capital of Mongolia?")
        await answered(pilot)
        assert not has_sources_block(starter.engine.prompts[1])
        assert starter.engine.prompts[1][-1]["content"].startswith("No source on this stick covers this question.")
        text = words(app)
        assert NOTHING_FOUND in text and "Sources (" not in text  # "[1]" in the answer points at nothing
        assert chat.conversation.messages[-1]["sources"] == []
        # and on: the next question is grounded again
        await ask(pilot, "And boiling water?")
        await answered(pilot, 2)
        assert has_sources_block(starter.engine.prompts[2])


@pytest.mark.anyio
async def test_no_knowledge_starts_off_and_checks_nothing_until_turned_on(knowledge_stick, state):
    starter = FakeStarter(knowledge_stick, state)
    starter.engine.enqueue("Boil it.")
    app = make_app(starter=starter, use_knowledge=False)  # kit chat --no-knowledge
    async with app.run_test(size=(100, 30)) as pilot:
        chat = await started(pilot)
        assert "knowledge: off" in screen_text(app)
        await pilot.pause(0.2)
        assert [s.state for s in chat.session.knowledge.states()] == ["waiting"]  # nothing hashed
        await pilot.press("f9")
        await wait_for(pilot, lambda: "knowledge: on (1 source)" in screen_text(app), what="the check")
        await ask(pilot, "How do I purify water by boiling?")
        await answered(pilot)
        assert has_sources_block(starter.engine.prompts[0])


@pytest.mark.anyio
async def test_the_check_shows_its_progress_and_a_model_switch_keeps_the_checked_library(
        knowledge_stick, state, monkeypatch):
    gate = threading.Event()
    real_open = Library._open_docs

    def slow_open(self, entry, on_block):  # the hash of a large source takes a while
        gate.wait(30)
        return real_open(self, entry, on_block)

    monkeypatch.setattr(Library, "_open_docs", slow_open)
    starter = FakeStarter(knowledge_stick, state)
    app = make_app(starter=starter)
    async with app.run_test(size=(100, 30)) as pilot:
        chat = await started(pilot)
        await wait_for(pilot, lambda: "knowledge: checking Survival demo, 0 %" in screen_text(app),
                       what="the progress in the top bar")
        library = chat.session.knowledge
        await ask(pilot, "How do I purify water by boiling?")  # before the check ends: said so
        await answered(pilot)
        assert ("Not searched yet, still being checked: Survival demo. The answer below is the model's alone"
                in words(app))
        assert not has_sources_block(starter.engine.prompts[0])
        gate.set()
        await wait_for(pilot, lambda: "knowledge: on (1 source)" in screen_text(app), what="the end of the check")
        # another model (which does not fit), then the kit's choice: the same stick's library goes on
        await pilot.press("f3", "down", "enter")
        await wait_for(pilot, lambda: isinstance(app.screen, FailureScreen), what="the failure screen")
        await pilot.press("a")
        await wait_for(pilot, lambda: len(starter.calls) == 3 and isinstance(app.screen, ChatScreen)
                       and app.screen is not chat, what="the restart")
        await wait_for(pilot, lambda: "knowledge: on (1 source)" in screen_text(app), what="the top bar")
        assert app.session.knowledge is library and library.states()[0].state == "verified"


@pytest.mark.anyio
async def test_a_damaged_source_is_notified_once_and_left_out(knowledge_stick, state):
    index = knowledge_stick / "KIT" / "knowledge" / KNOWLEDGE_ID / "passages.sqlite"
    data = bytearray(index.read_bytes())
    data[-100] ^= 0xFF
    index.write_bytes(bytes(data))
    starter = FakeStarter(knowledge_stick, state)
    starter.engine.enqueue("Boil it.")
    app = make_app(starter=starter)
    async with app.run_test(size=(100, 30)) as pilot:
        chat = await started(pilot)
        await wait_for(pilot, lambda: "knowledge: none usable" in screen_text(app), what="the top bar")
        # (run_test draws no toasts: the app's notifications are read instead)
        notices = [n for n in app._notifications if "Survival demo is not used" in n.message]
        assert len(notices) == 1 and notices[0].severity == "error"
        assert "knowledge/survival-demo/passages.sqlite is corrupt" in notices[0].message
        await ask(pilot, "How do I purify water by boiling?")
        await answered(pilot)
        assert not has_sources_block(starter.engine.prompts[0])
        assert chat.session.knowledge.states()[0].state == "damaged"


@pytest.mark.anyio
async def test_a_reopened_conversation_shows_its_sources_and_opens_them(knowledge_stick, state):
    starter = FakeStarter(knowledge_stick, state)
    starter.engine.enqueue("Cool it under running water [1].")
    app = make_app(starter=starter)
    async with app.run_test(size=(100, 30)) as pilot:
        chat = await knowledge_ready(pilot)
        await ask(pilot, "How do I cool a burn?")
        await answered(pilot)
        conv_id = chat.conversation.id
        await wait_for(pilot, lambda: HistoryStore(state).list().conversations, what="the save")
        saved = HistoryStore(state).load(conv_id)
        assert saved.messages[-1]["sources"][0]["path"] == "burns.md"
        await pilot.press("ctrl+n")
        await wait_for(pilot, lambda: "Cooling a burn" not in screen_text(app), what="a new conversation")
        await pilot.press("f4")
        await wait_for(pilot, lambda: "How do I cool a burn?" in screen_text(app), what="the list")
        await pilot.press("enter")
        await wait_for(pilot, lambda: "* [1] Burns — Cooling a burn (survival-demo: burns.md)" in screen_text(app),
                       what="the sources of the reopened answer")
        await pilot.press("f8", "enter")
        await wait_for(pilot, lambda: "Do not use ice, butter or toothpaste." in words(app), what="the text")
