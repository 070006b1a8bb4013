"""7. The chat in a real terminal: how fast the answer grows where the user sees it.

The chat runs in tmux (100x30) on a demo stick, as `kit chat` runs it (bench/chat_app.py only
sets the answer's length and temperature); the status line's token count ("Answering... N
tokens") is read every POLL_S seconds. From those readings: the chat's rate over the first and
over the last WINDOW tokens of a TOKENS-token answer. Side by side, `kit ask` answers the same
question on the same stick (same default preset, temperature and seed: a fresh process each), in
the same terminal under the same screen polling, and its own statistics line gives its rate; and
the engine alone (ChatEngine.answer in a process of its own, each piece timed) gives its rate over
the same two windows: llama.cpp itself slows down as the context fills, and this shows by how much.
The answers are compared: the same text means the same work was timed. Knowledge is off on every
side (`--no-knowledge`): this measures the screen, and the engine alone has no sources.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import ROOT, Section, compare, ensure_cache, fmt, interleave, median, say, spread
from bench.context import QUICK, Context

sys.path.insert(0, str(ROOT / "tests"))
from tmuxdrv import Tmux  # noqa: E402  (the real-terminal driver the TUI tests use)

TARGET = 0.9
QUESTION = "Write a very long story about a journey across the sea."
TEMPERATURE = 0.7  # with the stick's default preset and the default seed: 1,000+ tokens, no loop
TOKENS, WINDOW, ROUNDS = 1000, 200, 2
QUICK_TOKENS, QUICK_WINDOW = 300, 60
POLL_S = 0.2
APP = ROOT / "bench" / "chat_app.py"
START_TIMEOUT_S = 900  # the first start on a machine probes the CPU kernels
COUNT = re.compile(r"Answering\.\.\. (\d+) tokens")
CHAT_DONE = re.compile(r"([\d.]+) tok/s · context \d+ of \d+ tokens")
ASK_STATS = re.compile(r"\[(\d+) tokens, ([\d.]+) tok/s")


def time_at(samples: list[tuple[float, int]], count: float) -> float | None:
    """When the count on screen reached `count`, interpolated between two readings."""
    for (t0, n0), (t1, n1) in zip(samples, samples[1:], strict=False):
        if n0 <= count <= n1 and n1 > n0:
            return t0 + (t1 - t0) * (count - n0) / (n1 - n0)
    return None


def window_rate(samples: list[tuple[float, int]], first: float, last: float) -> float:
    """Tokens a second between two counts (NaN when the readings do not cover them)."""
    start, end = time_at(samples, first), time_at(samples, last)
    if start is None or end is None or end <= start:
        return float("nan")
    return (last - first) / (end - start)


def chat_stick() -> Path:
    """A demo stick without a frozen runtime (the venv's kit runs it: a build takes seconds)."""
    target = ensure_cache() / "chat-stick"
    subprocess.run([sys.executable, "-m", "kit", "build", "--profile", str(ROOT / "manifests" / "demo.toml"),
                    "--target", str(target), "--no-freeze"], check=True, cwd=ROOT, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return target


def run_chat(stick: Path, tokens: int) -> dict:
    env = {"KIT_BUNDLE": "", "KIT_DEBUG": ""}
    with Tmux(width=100, height=30) as term:
        term.start([sys.executable, APP, "--stick", stick, "--max-tokens", tokens,
                    "--temperature", TEMPERATURE, "--no-knowledge"], env=env)
        term.wait_for("Enter sends", timeout=START_TIMEOUT_S)
        before = set((stick / "KIT" / "state" / "history").glob("*.json"))
        term.type(QUESTION)
        term.keys("Enter")
        samples: list[tuple[float, int]] = []
        end = time.monotonic() + 60 + tokens  # far beyond a token a second
        screen = ""
        while time.monotonic() < end:
            screen = term.screen()
            found = COUNT.search(screen)
            if found:
                samples.append((time.monotonic(), int(found.group(1))))
            elif samples and CHAT_DONE.search(screen):
                break
            time.sleep(POLL_S)
        done = CHAT_DONE.search(screen)
        answer = _saved_answer(stick, before)
        term.keys("C-q")
        term.wait_exit(timeout=60)
    if not samples or done is None:
        raise RuntimeError(f"the chat's answer never ended; screen:\n{screen}")
    return {"samples": samples, "engine_tps": float(done.group(1)), "answer": answer}


def _saved_answer(stick: Path, before: set[Path], timeout: float = 15) -> str:
    """The answer as the chat kept it: its conversation saved on the stick."""
    folder = stick / "KIT" / "state" / "history"
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        new = set(folder.glob("*.json")) - before
        if new:
            messages = json.loads(max(new).read_text())["messages"]
            return next(m["content"] for m in reversed(messages) if m["role"] == "assistant")
        time.sleep(0.2)
    return ""


def run_ask(stick: Path, tokens: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp, Tmux(width=100, height=30) as term:
        out, err = Path(tmp) / "out.txt", Path(tmp) / "err.txt"
        kit = (f"{sys.executable} -m kit ask --stick {stick} --max-tokens {tokens} --temperature {TEMPERATURE}"
               " --no-knowledge")
        term.start(["sh", "-c", f"{kit} '{QUESTION}' 2>{err} | tee {out}"], env={"KIT_BUNDLE": "", "KIT_DEBUG": ""})
        term.wait_for(lambda s: term.exit_code(s) is not None, timeout=START_TIMEOUT_S + tokens,
                      interval=POLL_S)  # the same polling as the chat's side
        stats = ASK_STATS.search(err.read_text())
        if stats is None:
            raise RuntimeError(f"kit ask printed no statistics: {err.read_text()[-500:]}")
        return {"tokens": int(stats.group(1)), "tps": float(stats.group(2)), "answer": out.read_text()}


def run_engine(stick: Path, tokens: int) -> dict:
    """The same answer from the engine alone, in a fresh process: the time of every piece."""
    proc = subprocess.run([sys.executable, __file__, "--engine", str(stick), str(tokens)], capture_output=True,
                          text=True, timeout=START_TIMEOUT_S + tokens, cwd=ROOT, stdin=subprocess.DEVNULL,
                          env=dict(os.environ, PYTHONPATH=str(ROOT), KIT_BUNDLE="", KIT_DEBUG=""))
    if proc.returncode != 0:
        raise RuntimeError(f"the engine alone failed: {proc.stderr[-500:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def engine_child(stick: str, tokens: int) -> None:
    from kit import launch
    from kit.plan import Overrides

    session = launch.start(stick, Overrides())
    times, text = [], []
    for piece in session.engine.answer(session.messages(QUESTION), max_tokens=tokens, temperature=TEMPERATURE):
        times.append(time.perf_counter())
        text.append(piece)
    print(json.dumps({"samples": [(t, n) for n, t in enumerate(times, start=1)], "answer": "".join(text)}))


def run(ctx: Context) -> Section:
    quick = ctx.sizes == QUICK
    tokens, window = (QUICK_TOKENS, QUICK_WINDOW) if quick else (TOKENS, WINDOW)
    rounds = 1 if quick else ROUNDS
    stick = ctx._stick or chat_stick()
    say(f"chat in a real terminal: {rounds} rounds of a {tokens}-token answer: chat, kit ask, the engine alone")
    load_before = os.getloadavg()
    chats, asks, engines = interleave(rounds, lambda: run_chat(stick, tokens), lambda: run_ask(stick, tokens),
                                      lambda: run_engine(stick, tokens))
    load_after = os.getloadavg()

    def windows(runs: list[dict]) -> tuple[list[float], list[float]]:
        firsts, lasts = [], []
        for one in runs:
            samples = one["samples"]
            start, top = samples[0][1], samples[-1][1]
            firsts.append(window_rate(samples, start, start + window))
            lasts.append(window_rate(samples, top - window, top))
        return firsts, lasts

    firsts, lasts = windows(chats)
    engine_firsts, engine_lasts = windows(engines)
    reached = [c["samples"][-1][1] for c in chats]
    ask_tps = [a["tps"] for a in asks]
    engine_tps = [c["engine_tps"] for c in chats]
    same = [c["answer"].strip() == a["answer"].strip() == e["answer"].strip()
            for c, a, e in zip(chats, asks, engines, strict=True)]

    section = Section("7. Chat in a real terminal (tmux)", ["measure", "tok/s (median)", "range"])
    section.rows += [
        [f"chat, first {window} tokens on screen", fmt(median(firsts)), spread(firsts)],
        [f"chat, last {window} tokens on screen", fmt(median(lasts)), spread(lasts)],
        ["chat, the engine's own rate (status line at the end)", fmt(median(engine_tps)), spread(engine_tps)],
        ["kit ask, same answer (its statistics line)", fmt(median(ask_tps)), spread(ask_tps)],
        [f"engine alone, first {window} tokens", fmt(median(engine_firsts)), spread(engine_firsts)],
        [f"engine alone, last {window} tokens", fmt(median(engine_lasts)), spread(engine_lasts)],
    ]
    section.ratios += compare(f"chat: last {window} / first {window} tokens", lasts, firsts, TARGET)
    section.ratios += compare(f"chat last {window} tokens / kit ask", lasts, ask_tps, TARGET)
    section.notes.append(
        f"the engine alone, last {window} / first {window}: {median(engine_lasts) / median(engine_firsts):.3f}; "
        f"chat / engine alone, first {window}: {median(firsts) / median(engine_firsts):.3f}, last {window}: "
        f"{median(lasts) / median(engine_lasts):.3f}")
    section.notes += [
        f"question {QUESTION!r}, the stick's default preset, temperature {TEMPERATURE}, default seed, "
        f"max {tokens} tokens; the chat reached {', '.join(map(str, reached))} tokens, kit ask "
        f"{', '.join(str(a['tokens']) for a in asks)}",
        f"the same answer text in the chat, from kit ask and from the engine alone: "
        f"{', '.join('yes' if s else 'NO' for s in same)}",
        f"screen read every {POLL_S} s in both terminals (tmux capture-pane), {rounds} interleaved rounds",
        f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after ({os.cpu_count()} CPUs)",
    ]
    section.data = {"chat": chats, "ask": asks, "engine": engines, "window": window, "tokens": tokens}
    return section


if __name__ == "__main__":  # the engine-alone child
    parser = argparse.ArgumentParser()
    parser.add_argument("--engine", nargs=2, metavar=("STICK", "TOKENS"), required=True)
    args = parser.parse_args()
    engine_child(args.engine[0], int(args.engine[1]))
