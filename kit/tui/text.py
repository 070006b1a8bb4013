"""Words and numbers for the screens: pure functions, no textual (tested without an app)."""

from __future__ import annotations

import math
import traceback

from kit import errors
from kit.conversation import LOOP_NOTE
from kit.engine import GenStats
from kit.integrity import Progress
from kit.units import human_bytes


def duration(seconds: float) -> str:
    """'0.4 s', '5 s', '2 min 5 s': tenths only where whole seconds would say '0 s'."""
    if isinstance(seconds, float) and seconds < 10:
        return f"{max(0.0, seconds):.1f} s"
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, rest = divmod(seconds, 60)
    return f"{minutes} min {rest} s" if rest else f"{minutes} min"


def progress_details(p: Progress) -> str:
    """'120.3 MiB of 241.3 MiB · 85.2 MiB/s · about 2 s left'."""
    parts = [f"{human_bytes(p.all_done)} of {human_bytes(p.all_total)}"]
    if p.rate > 0:
        parts.append(f"{human_bytes(p.rate)}/s")
    if p.eta is not None and p.all_done < p.all_total:
        parts.append(f"about {duration(math.ceil(p.eta))} left")
    return " · ".join(parts)


def progress_bar(fraction: float, width: int) -> str:
    """Block characters every console font has (CP437): no truecolor, no special glyphs."""
    width = max(1, width)
    filled = int(round(max(0.0, min(1.0, fraction)) * width))
    return "█" * filled + "░" * (width - filled)


def stats_line(stats: GenStats | None, n_ctx: int, *, answering: bool) -> str:
    if stats is None:
        return f"Ready · context 0 of {n_ctx} tokens" if not answering else "Answering... · Esc stops"
    speed = f"{stats.tokens_per_s:.1f} tok/s"
    if answering:
        return f"Answering... {stats.completion_tokens} tokens, {speed} · Esc stops"
    pct = round(100 * stats.context_used / n_ctx) if n_ctx else 0
    line = f"{speed} · context {stats.context_used} of {n_ctx} tokens ({pct}%)"
    if stats.looped:
        line = f"{LOOP_NOTE[0].upper()}{LOOP_NOTE[1:]} · {line}"
    elif stats.stopped:
        line = "Stopped · " + line
    if pct >= 80:
        line += " · nearly full: Ctrl+N starts afresh"
    return line


# What each kind of failure means for the person at the keyboard; the first class in the
# error's MRO that is listed wins. str(err) says what happened, err.hint what to do.
MEANINGS: dict[type, str] = {
    errors.NotVerifiedError: "The kit was asked to load a file it had not checked. It refused: nothing "
                             "unchecked ever runs.",
    errors.SignatureError: "The stick's list of files is not signed by the key it should be. Someone may "
                           "have changed the stick.",
    errors.IntegrityError: "A file on the stick is not the file that was put there when the stick was "
                           "built: it is damaged or was changed. The kit will not run it, because a "
                           "damaged model can give wrong answers or crash.",
    errors.IncompleteBundleError: "Making this stick was interrupted before it finished, so some files "
                                  "are missing. Nothing on it is trusted until it is finished.",
    errors.UnsafePathError: "The stick's file list points outside the stick. The kit does not follow it: "
                            "this stick may have been tampered with.",
    errors.ManifestError: "The stick's file list (KIT/bundle.json) cannot be read, so no file on the stick "
                          "can be checked.",
    errors.BundleNotFoundError: "The kit could not find the stick's KIT folder.",
    errors.PlanError: "This computer does not have enough free memory for the model, or a setting you "
                      "chose does not fit it.",
    errors.KernelError: "None of the kit's processor programs runs on this computer's CPU.",
    errors.EngineError: "The model could not be started on this computer, even with smaller settings.",
    errors.OfflineViolation: "Part of the kit tried to use the network. The kit runs offline only, so it "
                             "stopped.",
    OSError: "The computer could not read or write a file the kit needs.",
}
UNEXPECTED_MEANING = "Something went wrong that the kit does not know how to explain."


def failure_parts(err: BaseException) -> tuple[str, str, str, int]:
    """(what happened, what it means, what to do, exit code) for any error, through kit.errors' table."""
    what, fix, code = errors.describe_error(err)
    meaning = next((MEANINGS[c] for c in type(err).__mro__ if c in MEANINGS), UNEXPECTED_MEANING)
    return what, meaning, fix, code


def traceback_text(err: BaseException) -> str:
    return "".join(traceback.format_exception(err))


_KEY_NAMES = {"escape": "Esc", "enter": "Enter", "tab": "Tab", "up": "Up", "down": "Down",
              "pageup": "PgUp", "pagedown": "PgDn", "delete": "Del"}


def key_label(keys: str) -> str:
    """'f1,ctrl+g' -> 'F1 / Ctrl+G': how the help screen writes a binding's keys."""
    def one(key: str) -> str:
        if key in _KEY_NAMES:
            return _KEY_NAMES[key]
        parts = key.split("+")
        *mods, last = parts
        last = _KEY_NAMES.get(last, last.upper() if len(last) == 1 or last[0] == "f" else last)
        return "+".join([m.capitalize() for m in mods] + [last])

    return " / ".join(one(k.strip()) for k in keys.split(","))
