"""Saved conversations: one JSON file per conversation under the stick's state/history/.

Part of the pure core: no textual, no llama_cpp. Two kits started from one stick at once must not
damage each other's files, so there is no shared index: every conversation has its own file with a
unique id (time + random), written to a temp name unique to the writer and renamed into place.
A reader sees a whole file or none. With no state folder (a read-only stick) conversations live in
memory only, and `persistent` says so.
"""

from __future__ import annotations

import json
import re
import secrets
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from kit.errors import KitError
from kit.fsutil import atomic_write
from kit.passages import Passage

SCHEMA_VERSION = 1
HISTORY_DIRNAME = "history"
EXPORTS_DIRNAME = "exports"
TITLE_LENGTH = 60
_ID = re.compile(r"^\d{8}-\d{6}-[0-9a-f]{8}$")
ROLES = ("user", "assistant")
# An answer's sources (kit.grounding numbered them from 1 in this order): what a citation needs to be
# shown and opened again, never the passage's text. The key is absent when no search was made
# (knowledge off, none on the stick); an empty list says the search found nothing.
SOURCE_KEYS = ("source", "path", "title", "section")
MAX_SOURCES = 20

# Upgrade steps from an older schema_version to the next: {old_version: function(dict) -> dict}.
UPGRADES: dict[int, object] = {}


class HistoryError(KitError):
    hint = "the other conversations are still there; this one cannot be used"


def _now() -> datetime:
    return datetime.now(UTC)


def _stamp(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def new_id(moment: datetime | None = None) -> str:
    """Sortable by time, unique across processes by 32 random bits."""
    return f"{(moment or _now()):%Y%m%d-%H%M%S}-{secrets.token_hex(4)}"


@dataclass
class Conversation:
    id: str
    created: str
    updated: str
    messages: list[dict] = field(default_factory=list)  # {"role", "content"[, "stopped", "sources"]}; no system
    model_id: str | None = None
    preset_id: str | None = None

    @property
    def title(self) -> str:
        first = next((m["content"] for m in self.messages if m["role"] == "user"), "")
        line = " ".join(first.split())
        return (line[: TITLE_LENGTH - 3] + "...") if len(line) > TITLE_LENGTH else (line or "(empty)")

    @property
    def empty(self) -> bool:
        return not self.messages

    def add(self, role: str, content: str, *, stopped: bool = False, sources: list[dict] | None = None) -> None:
        message = {"role": role, "content": content}
        if stopped:
            message["stopped"] = True
        if sources is not None:
            message["sources"] = [{k: s[k] for k in SOURCE_KEYS} for s in sources]
        self.messages.append(message)
        self.updated = _stamp(_now())

    def prompt_history(self) -> list[dict]:
        """The messages as an engine takes them: role and content only."""
        return [{"role": m["role"], "content": m["content"]} for m in self.messages]

    def to_dict(self) -> dict:
        return {"schema_version": SCHEMA_VERSION, "id": self.id, "created": self.created,
                "updated": self.updated, "model_id": self.model_id, "preset_id": self.preset_id,
                "messages": self.messages}

    @classmethod
    def from_dict(cls, data: object) -> Conversation:
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        version = data.get("schema_version")
        if not isinstance(version, int) or version < 1:
            raise ValueError(f"schema_version {version!r} is not valid")
        if version > SCHEMA_VERSION:
            raise ValueError(f"written by a newer kit (schema_version {version})")
        while version < SCHEMA_VERSION:
            data = UPGRADES[version](data)  # type: ignore[operator]
            version = data["schema_version"]
        conv_id = data.get("id")
        if not isinstance(conv_id, str) or not _ID.match(conv_id):
            raise ValueError(f"id {conv_id!r} is not valid")
        messages = data.get("messages")
        if not isinstance(messages, list) or not all(_valid_message(m) for m in messages):
            raise ValueError("messages are malformed")
        texts = [data.get(k) for k in ("created", "updated")]
        if not all(isinstance(t, str) for t in texts):
            raise ValueError("created/updated must be strings")
        optional = [data.get(k) for k in ("model_id", "preset_id")]
        if not all(v is None or isinstance(v, str) for v in optional):
            raise ValueError("model_id/preset_id must be strings")
        return cls(conv_id, texts[0], texts[1], [dict(m) for m in messages], *optional)


def _valid_message(m: object) -> bool:
    return (isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)
            and isinstance(m.get("stopped", False), bool) and _valid_sources(m.get("sources", [])))


def _valid_sources(sources: object) -> bool:
    return isinstance(sources, list) and len(sources) <= MAX_SOURCES and all(
        isinstance(s, dict) and all(isinstance(s.get(k), str) for k in SOURCE_KEYS) for s in sources)


def from_stored(stored: Sequence[dict]) -> tuple[Passage, ...]:
    """An answer's stored sources as passages without their text, to be cited and opened again."""
    return tuple(Passage(s["source"], s["path"], s["title"], s["section"], "") for s in stored)


def new_conversation(model_id: str | None = None, preset_id: str | None = None) -> Conversation:
    moment = _now()
    return Conversation(new_id(moment), _stamp(moment), _stamp(moment), [], model_id, preset_id)


@dataclass(frozen=True)
class Summary:
    id: str
    title: str
    updated: str
    messages: int
    model_id: str | None


@dataclass(frozen=True)
class Listing:
    conversations: tuple[Summary, ...]  # newest first
    unreadable: tuple[str, ...] = ()  # "<file>: <why>" for files that could not be read


def to_markdown(conv: Conversation, *, assistant: str = "Assistant", preset: str | None = None) -> str:
    """A conversation as a Markdown document a person can read anywhere."""
    lines = [f"# {conv.title}", "", f"- Started: {conv.created}", f"- Last answer: {conv.updated}"]
    if conv.model_id:
        lines.append(f"- Model: {conv.model_id}")
    if preset:
        lines.append(f"- Preset: {preset}")
    for m in conv.messages:
        who = "You" if m["role"] == "user" else assistant
        lines += ["", f"## {who}", "", m["content"].strip()]
        if m.get("stopped"):
            lines += ["", "*(stopped before the end)*"]
        if m.get("sources"):
            sources = from_stored(m["sources"])
            lines += ["", "Sources:", "", *(f"- [{i}] {p.citation()}" for i, p in enumerate(sources, 1))]
    return "\n".join(lines) + "\n"


class HistoryStore:
    """Conversations on the stick (state/history/<id>.json) or, without a state folder, in memory."""

    def __init__(self, state: Path | None):
        self.state = state
        self.folder = state / HISTORY_DIRNAME if state is not None else None
        self.exports = state / EXPORTS_DIRNAME if state is not None else None
        self._memory: dict[str, Conversation] = {}
        self._lock = threading.Lock()  # saves run in worker threads; one writer per file at a time

    @property
    def persistent(self) -> bool:
        return self.folder is not None

    def _path(self, conv_id: str) -> Path:
        if not _ID.match(conv_id):
            raise HistoryError(f"{conv_id!r} is not a conversation id")
        assert self.folder is not None
        return self.folder / f"{conv_id}.json"

    def save(self, conv: Conversation) -> None:
        """Store a copy; raises OSError when the stick refuses the write (full, pulled out)."""
        if conv.empty:
            return
        copy = Conversation.from_dict(json.loads(json.dumps(conv.to_dict())))
        with self._lock:
            if self.folder is None:
                self._memory[conv.id] = copy
                return
            data = json.dumps(copy.to_dict(), indent=1, ensure_ascii=False).encode() + b"\n"
            atomic_write(self._path(conv.id), data)

    def load(self, conv_id: str) -> Conversation:
        if self.folder is None:
            if conv_id not in self._memory:
                raise HistoryError(f"there is no conversation {conv_id}")
            return Conversation.from_dict(self._memory[conv_id].to_dict())
        path = self._path(conv_id)
        try:
            return Conversation.from_dict(json.loads(path.read_bytes()))
        except FileNotFoundError:
            raise HistoryError(f"conversation {conv_id} is gone (deleted by another kit?)") from None
        except (OSError, ValueError, KeyError) as exc:  # JSONDecodeError is a ValueError
            raise HistoryError(f"conversation {path.name} cannot be read: {exc}") from None

    def list(self) -> Listing:
        if self.folder is None:
            convs = [Conversation.from_dict(c.to_dict()) for c in self._memory.values()]
            return Listing(_summaries(convs))
        convs, unreadable = [], []
        for path in sorted(self.folder.glob("*.json")):  # temp files start with "." and end .part
            if not _ID.match(path.stem):
                continue
            try:
                convs.append(Conversation.from_dict(json.loads(path.read_bytes())))
            except FileNotFoundError:  # deleted by another kit between glob and read
                continue
            except (OSError, ValueError, KeyError) as exc:
                unreadable.append(f"{path.name}: {exc}")
        return Listing(_summaries(convs), tuple(unreadable))

    def delete(self, conv_id: str) -> None:
        with self._lock:
            if self.folder is None:
                self._memory.pop(conv_id, None)
                return
            self._path(conv_id).unlink(missing_ok=True)

    def export(self, conv: Conversation, markdown: str) -> Path | None:
        """Write the Markdown into state/exports/; None when there is nowhere to write it."""
        if self.exports is None:
            return None
        target = self.exports / f"{conv.id}.md"
        atomic_write(target, markdown.encode())
        return target

    def save_text(self, name: str, text: str) -> Path | None:
        """A loose text (an answer to copy by hand) into state/exports/; None when read-only."""
        if self.exports is None:
            return None
        target = self.exports / f"{new_id()}-{name}.md"
        atomic_write(target, text.encode())
        return target


def _summaries(convs: list[Conversation]) -> tuple[Summary, ...]:
    ordered = sorted(convs, key=lambda c: (c.updated, c.id), reverse=True)
    return tuple(Summary(c.id, c.title, c.updated, len(c.messages), c.model_id) for c in ordered)
