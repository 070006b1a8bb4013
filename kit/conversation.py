"""How every front end starts a conversation and what it says when an answer ends badly.

Part of the pure core (no textual, no llama_cpp). `kit ask`, the chat and (later) the server build
the first messages of a question here, so the same question gets the same prompt everywhere: the
stick's default preset (its first) unless the user names another, or none (`--preset none`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kit.errors import KitError, PlanError
from kit.manifest import Preset

NO_PRESET = "none"  # what the user types for "no system prompt"
LOOP_NOTE = "stopped: the model was repeating itself"
DEFAULT_MAX_TOKENS = 512
DEFAULT_TEMPERATURE = 0.3


@dataclass(frozen=True)
class AnswerSettings:
    """How long an answer may grow and how freely its words are chosen (0: always the likeliest)."""

    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = DEFAULT_TEMPERATURE


class EmptyAnswerError(KitError):
    """The model ended its answer without writing anything."""

    hint = "rephrase the question, or try another preset or another model"

    def __init__(self, message: str = "the model gave no answer", hint: str | None = None):
        super().__init__(message, hint)

    def sentence(self) -> str:
        """The one sentence every front end shows."""
        return f"{str(self).capitalize()}: {self.hint}."


def default_preset(presets: Sequence[Preset]) -> Preset | None:
    """The stick's first preset; the kit itself ships none."""
    return presets[0] if presets else None


def choose_preset(presets: Sequence[Preset], asked: str | None = None) -> Preset | None:
    """None: the stick's default; NO_PRESET: no system prompt; otherwise the preset with that id."""
    if asked is None:
        return default_preset(presets)
    if asked == NO_PRESET:
        return None
    chosen = next((p for p in presets if p.id == asked), None)
    if chosen is None:
        names = ", ".join(p.id for p in presets)
        raise PlanError(f"this stick has no preset {asked!r}",
                        f"presets: {names + ', ' if names else ''}or {NO_PRESET!r} for no system prompt")
    return chosen


def first_messages(question: str, preset: Preset | None, history: Sequence[dict] = ()) -> list[dict]:
    """What the engine is sent for a question: the preset's system prompt, the conversation so far
    (role and content only), the question."""
    system = [{"role": "system", "content": preset.system}] if preset is not None else []
    earlier = [{"role": m["role"], "content": m["content"]} for m in history]
    return system + earlier + [{"role": "user", "content": question}]
