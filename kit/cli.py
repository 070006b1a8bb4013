"""The command line: parse, call the core, render data or one-line errors.

A thin shell: commands call kit.launch / kit.builder / the core, which return data; kit.report
turns it into text and `--json` prints the same data. Errors go through kit.errors' one table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path

from kit import __version__
from kit.conversation import DEFAULT_MAX_TOKENS, DEFAULT_TEMPERATURE
from kit.errors import KitError, describe_error
from kit.paths import BundlePaths, debug_enabled
from kit.units import human_bytes


def _print_json(data: object) -> None:
    print(json.dumps(data, indent=2, sort_keys=True, default=str))


class ProgressLine:
    """A single self-rewriting progress line on a terminal; silent when stderr is not one."""

    def __init__(self, label: str):
        self.label = label
        self.tty = sys.stderr.isatty()
        self.last = -1.0

    def __call__(self, p) -> None:
        if not self.tty or p.all_total == 0:
            return
        pct = 100 * p.all_done / p.all_total
        if pct - self.last < 1 and p.all_done < p.all_total:
            return
        self.last = pct
        eta = f", {p.eta:.0f} s left" if p.eta is not None else ""
        sys.stderr.write(f"\r{self.label}: {pct:3.0f}%  {human_bytes(p.rate)}/s{eta}   ")
        if p.all_done >= p.all_total:
            sys.stderr.write("\n")
        sys.stderr.flush()


class JobProgress:
    """A clone's progress on a terminal: a line for the whole job and one per target (bytes, speed,
    time left), redrawn in place; each phase's last state stays on screen. Silent when stderr is not
    a terminal."""

    def __init__(self):
        self.tty = sys.stderr.isatty()
        self.phase, self.drawn, self.last = None, 0, 0.0

    def __call__(self, step) -> None:
        finished = step.job.done >= step.job.total
        if not self.tty or (step.phase == self.phase and not finished and time.monotonic() - self.last < 0.25):
            return
        if step.phase != self.phase:
            self.phase, self.drawn = step.phase, 0  # a new block of lines under the last phase's
        self.last = time.monotonic()
        lines = [f"{step.phase}: {self._tally(step.job)}", *(f"  {t.name}: {self._tally(t)}" for t in step.targets)]
        up = f"\x1b[{self.drawn}F" if self.drawn else ""
        sys.stderr.write(up + "".join(f"{line}\x1b[K\n" for line in lines))
        sys.stderr.flush()
        self.drawn = len(lines)

    @staticmethod
    def _tally(t) -> str:
        pct = 100 * t.done / t.total if t.total else 100.0
        settled = time.monotonic() - t.start > 1  # the first blocks say little about the speed
        eta = f", {t.eta:.0f} s left" if settled and t.eta is not None and t.done < t.total else ""
        return f"{human_bytes(t.done)} of {human_bytes(t.total)} ({pct:3.0f}%), {human_bytes(t.rate)}/s{eta}"


# ---------------------------------------------------------------- commands

def cmd_verify(args) -> int:
    from kit import integrity, rollback, signing
    from kit.paths import find_bundle, state_dir
    from kit.report import render_signer, render_verify

    bundle = find_bundle(args.stick)
    key = signing.load_public_key(args.key) if args.key else None
    trust = signing.check_stick(bundle, key=key, expected_fingerprint=args.fingerprint)
    manifest = trust.manifest
    rollback.check_bundle(bundle, trust.raw, state_dir(bundle), record=False)
    progress = None if args.json else ProgressLine("verifying")
    report = integrity.verify_bundle(bundle.kit, manifest, progress=progress)
    if args.json:
        _print_json(report.to_dict() | {"stick": str(bundle.root), "signer": trust.signer_label})
    else:
        print(render_verify(report))
        print(render_signer(trust.signer, required=key is not None or bool(args.fingerprint)))
    return 0 if report.ok else 4


def _overrides(args):
    from kit.plan import Overrides

    return Overrides(model=args.model, n_ctx=args.ctx, threads=args.threads,
                     gpu_layers=args.gpu_layers)


def cmd_doctor(args) -> int:
    from kit import launch
    from kit.report import render_doctor

    if args.parallel is not None and not (args.serve or args.pool):
        raise KitError("--parallel plans kit serve's slots", "add --serve: kit doctor --serve --parallel N")
    workers = _find_pool(args, quiet=args.json)
    report = launch.doctor(args.stick, _overrides(args), refresh=args.refresh,
                           on_probe=None if args.json else _print_probe, serve=args.serve, parallel=args.parallel,
                           pool=workers, on_knowledge=_knowledge_lines(quiet=args.json),
                           on_gpu_probe=None if args.json else _print_gpu_probe)
    if args.json:
        _print_json(report.to_dict())
    else:
        print(render_doctor(report))
    return 0 if report.plan else 1


def _print_gpu_probe(result) -> None:
    print(f"  probed GPU {result.name}: {result.state}", file=sys.stderr)


def _print_probe(result) -> None:
    print(f"  probed {result.variant}: {result.state} {result.detail}".rstrip(), file=sys.stderr)


def cmd_ask(args) -> int:
    question = " ".join(args.question).strip()
    if not question:
        raise KitError("the question is empty", 'write it after ask: kit ask "How do I purify water?"')
    session = _starter(args)(_overrides(args), on_progress=ProgressLine("checking the model"),
                             on_status=lambda s: print(s, file=sys.stderr))
    try:
        return _answer(args, session, question)
    finally:
        session.knowledge.close()
        if args.pool:
            session.engine.close()  # the pool's llama-server


def _knowledge_lines(quiet: bool = False):
    """What a knowledge check shows on stderr: a line a source when its check ends, and on a
    terminal its progress rewritten in place ("knowledge: checking WikiMed, 40 %")."""
    tty = sys.stderr.isatty()

    def show(state) -> None:
        if quiet or (state.state == "checking" and not tty):
            return
        sys.stderr.write(("\r" if tty else "") + state.line() + ("\x1b[K" if tty else "")
                         + ("" if state.state == "checking" else "\n"))
        sys.stderr.flush()

    return show


def _check_knowledge(library, *, quiet: bool = False) -> None:
    """Verify the stick's knowledge before it is searched; a source that fails is named and left out."""
    if not library.empty:
        library.check_all(on_change=_knowledge_lines(quiet))


def _answer(args, session, question: str) -> int:
    from kit.conversation import LOOP_NOTE
    from kit.grounding import NOTHING_FOUND, cited, render_sources

    use_knowledge = not args.no_knowledge
    if use_knowledge:
        _check_knowledge(session.knowledge)
    grounded = session.grounded(question, preset=args.preset, use_knowledge=use_knowledge,
                                max_tokens=args.max_tokens)  # the same first messages as the chat
    if grounded.nothing_found:
        print(NOTHING_FOUND, file=sys.stderr)
    answer = []
    for piece in session.engine.answer(grounded.messages, max_tokens=args.max_tokens, temperature=args.temperature):
        answer.append(piece)
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if grounded.sources:
        used = cited("".join(answer), len(grounded.sources))
        print(f"\nSources:\n{render_sources(grounded.sources, used)}")
    sys.stdout.flush()  # before the statistics on stderr
    stats = session.engine.last_stats
    if stats and stats.looped:
        print(LOOP_NOTE, file=sys.stderr)
    if stats and not args.quiet:
        print(f"[{stats.completion_tokens} tokens, {stats.tokens_per_s:.1f} tok/s, model "
              f"{session.plan.model_id}, kernel {session.plan.cpu_variant}]", file=sys.stderr)
    return 0


def cmd_search(args) -> int:
    from kit import launch
    from kit.errors import KnowledgeError
    from kit.knowledge import Library
    from kit.report import render_search

    query = " ".join(args.query).strip()
    if not query:
        raise KitError("the search is empty", 'write what to look for: kit search "purify water"')
    if args.limit < 1:
        raise KitError(f"--limit {args.limit} finds nothing", "give a number of passages, 1 or more")
    opened = launch.open_stick(args.stick)
    library = Library(opened.bundle, opened.manifest)
    if library.empty:
        raise KitError("this stick carries no knowledge to search",
                       "add [[knowledge]] to its profile and build it again")
    try:
        _check_knowledge(library, quiet=args.json)
        states = library.states()
        if not library.usable:
            failed = next((s for s in states if s.detail), None)
            why = f": {failed.name}: {failed.detail}" if failed else ""
            raise KnowledgeError(f"no knowledge on this stick can be used{why}")
        hits = library.search(query, args.limit)
    finally:
        library.close()
    if args.json:
        _print_json({"query": query, "stick": str(opened.bundle.root),
                     "results": [{"rank": i, "citation": h.passage.citation(), "source": h.passage.source,
                                  "path": h.passage.path, "title": h.passage.title, "section": h.passage.section,
                                  "text": h.passage.text, "relevant": h.relevant}
                                 for i, h in enumerate(hits, 1)],
                     "knowledge": [s.to_dict() for s in states]})
    else:
        print(render_search(query, hits, states))
    return 0 if hits else 1


def _starter(args):
    """launch.start bound to the stick, or with --pool kit.poolchat.start_pooled bound to the workers."""
    import functools

    if getattr(args, "pool", None):
        from kit import poolchat

        return functools.partial(poolchat.start_pooled, args.stick, _pool_endpoints(args))
    from kit import launch

    return functools.partial(launch.start, args.stick)


def _pool_endpoints(args) -> tuple[tuple[str, int], ...]:
    """--pool HOST:PORT,... as (host, port) pairs; () without it."""
    if not getattr(args, "pool", None):
        return ()
    from kit import poolplan

    return tuple(poolplan.parse_pool(args.pool))


def _find_pool(args, *, quiet: bool = False) -> list:
    from kit import pool

    return pool.find_pool(_pool_endpoints(args),
                          on_status=(lambda s: None) if quiet else (lambda s: print(s, file=sys.stderr)))


def cmd_chat(args) -> int:
    from kit.tui.app import run

    return run(args.stick, _overrides(args), starter=_starter(args) if args.pool else None,
               use_knowledge=not args.no_knowledge)


def cmd_serve(args) -> int:
    from kit import serve

    if args.keep_key and not args.lan:
        raise KitError("--keep-key keeps the key of --lan", "add --lan, or leave --keep-key out")
    from kit.errors import PoolLost

    options = serve.ServeOptions(port=args.port, lan=args.lan, parallel=args.parallel,
                                 key_file=Path(args.key_file) if args.key_file else None, keep_key=args.keep_key,
                                 pool=_pool_endpoints(args))
    overrides = _overrides(args)
    with serve.stop_on_signals() as stop:
        while True:
            server = serve.start(args.stick, overrides, options, on_progress=ProgressLine("checking the model"),
                                 on_status=lambda s: print(s, file=sys.stderr))
            try:
                print(_serving_banner(server.serving), flush=True)
                line = StatusLine()
                try:
                    serve.watch(server, line, stop)
                except KeyboardInterrupt:
                    pass
                finally:
                    line.end()  # an error's sentence goes on a line of its own
            except PoolLost as lost:  # llama-server is killed already (kit.pool.PoolWatch.check)
                # the team keeps a server: the largest model this computer holds alone, same port and key
                print(f"kit serve: {lost}; going on without the pool", file=sys.stderr, flush=True)
                options = replace(options, pool=(), key=server.serving.key)  # the team's links still work
                overrides = replace(overrides, model=None, gpu_layers=None)  # what this computer holds alone
                continue
            finally:
                server.close()
            break
    print("kit serve: stopped; llama-server has exited", file=sys.stderr)
    return 0


def _serving_banner(serving) -> str:
    from kit import serve

    plan, sp = serving.plan, serving.serve_plan
    out = [f"Serving {serving.model.name}: {sp.slots} slot{'s' if sp.slots > 1 else ''} of {sp.slot_ctx} tokens, "
           f"{plan.threads} threads, CPU kernel {plan.cpu_variant}, {serving.load_mode.mode}"]
    out.append(f"  on this computer: {serving.urls[0]}")
    for url in serving.urls[1:]:
        out.append(f"  on the network:   {url}")
    if serving.lan and len(serving.urls) == 1:
        out.append("  on the network:   no network address found (is Wi-Fi or a cable connected?)")
    base = serving.share_url
    if serving.key:
        out.append(f"  key:              {serving.key}")
        out.append(f"  API (OpenAI):     base_url {base}v1, api_key the key above")
    else:
        out.append(f"  API (OpenAI):     base_url {base}v1 (no key: only this computer can connect)")
    if serving.lan and len(serving.urls) > 1:
        out.append("  scan to join (the key is in the link):")
        out.append(_qr_text(serving.join_url))
    if serving.pool:
        out.append(f"  pool:             {plan.gpu_layers} layers on {', '.join(w.endpoint for w in serving.pool)}; "
                   "the token embeddings and the rest here")
    out.append(serve.DISCLAIMER)
    out.append("Ctrl+C stops the server.")
    return "\n".join(out)


def _qr_text(data: str) -> str:
    import io

    import segno

    buffer = io.StringIO()
    segno.make(data, error="m").terminal(out=buffer, compact=True, border=2)
    return buffer.getvalue().rstrip("\n")


class StatusLine:
    """kit serve's live status: one line rewritten in place on a terminal; elsewhere a line each
    time it changes."""

    def __init__(self):
        self.tty = sys.stdout.isatty()
        self.last = ""

    def __call__(self, status) -> None:
        text = (f"slots {status.slots_busy}/{status.slots} busy, {status.waiting} waiting, "
                f"{status.served} answered, {status.tokens_per_s:.1f} tok/s")
        if self.tty:
            sys.stdout.write(f"\r{text}\x1b[K")
            sys.stdout.flush()
        elif text != self.last:
            print(text, flush=True)
        self.last = text

    def end(self) -> None:
        if self.tty and self.last:
            sys.stdout.write("\n")
            sys.stdout.flush()


def cmd_pool_worker(args) -> int:
    from kit import pool, poolplan, serve

    options = pool.WorkerOptions(bind=args.bind, port=args.port, memory=args.memory, threads=args.threads,
                                 trusted=args.i_trust_this_network)
    with serve.stop_on_signals() as stop:
        worker = pool.start_worker(args.stick, options, on_progress=ProgressLine("checking the model"),
                                   on_status=lambda s: print(s, file=sys.stderr))
        try:
            f = worker.facts
            print("\n".join([
                f"kit pool worker: rpc-server at {worker.endpoint} (its facts on port "
                f"{options.port + poolplan.FACTS_PORT_OFFSET})",
                f"  kit {f.kit}, RPC protocol {poolplan.protocol_text(f.protocol)}, {worker.offer_reason}, "
                f"{f.threads} threads, CPU kernel {f.kernel}",
                f"  on the lead:  kit serve --pool {worker.endpoint}   (or kit chat --pool {worker.endpoint})",
                "  WARNING: rpc-server has no password. Anyone who reaches this address can use this computer's "
                "memory and CPU and send it data; use it only on the team's own network, and stop it when the "
                "work is done.",
                "Ctrl+C stops the worker."]), flush=True)
            try:
                worker.wait(stop)
            except KeyboardInterrupt:
                pass
        finally:
            worker.close()
    print("kit pool worker: stopped; rpc-server has exited", file=sys.stderr)
    return 0


def _size(text: str) -> int:
    """--memory: 3G, 512M, 2.5GiB (binary units), or bytes."""
    import re

    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", text, re.I)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size: write e.g. 3G or 512M")
    return int(float(m.group(1)) * 1024 ** "BKMGT".index((m.group(2) or "B").upper()))


def _needs_python_install(command: str) -> None:
    """The stick's runtime leaves the builder out: building happens on a connected machine."""
    if getattr(sys, "frozen", False):
        raise KitError(f"`kit {command}` does not run from a stick's runtime",
                       "run it from a Python install of the kit (bash build/install.sh) on a connected machine")


def cmd_build(args) -> int:
    _needs_python_install("build")
    from kit.builder import build

    result = build(Path(args.profile), Path(args.target), max_file_size=args.max_file_size,
                   runtimes=[Path(r) for r in args.runtime], freeze=not args.no_freeze, platforms=args.platform,
                   progress=None if args.json else ProgressLine("copying to the stick"),
                   sign_key=Path(args.sign) if args.sign else None,
                   report=lambda s: print(s, file=sys.stderr))
    if args.json:
        _print_json(result.to_dict())
    else:
        print(result.summary())
    return 0


def _source_stick(path: str | None) -> BundlePaths:
    """The stick to copy from: the path given, else the stick as `kit verify` finds it (KIT_BUNDLE,
    or the stick this runtime is on)."""
    from kit.errors import BundleNotFoundError
    from kit.paths import find_bundle

    try:
        return find_bundle(path)
    except BundleNotFoundError:
        if path is not None:
            raise
        raise KitError("no source stick given",
                       "name it: kit clone SRC DST [DST ...], or kit update DST --from SRC") from None


def _clone_paths(args) -> tuple[BundlePaths, list[Path]]:
    """SRC and the targets of `kit clone [SRC] DST ...`. From a stick's runtime (START-linux.sh clone
    DST ...), or with one path, every path is a target and the source is the stick as `kit verify`
    finds it; otherwise the first path is the source."""
    paths = [Path(p) for p in args.paths]
    if args.source is not None:
        return _source_stick(args.source), paths
    if getattr(sys, "frozen", False) or len(paths) == 1:
        return _source_stick(None), paths
    return _source_stick(str(paths[0])), paths[1:]


def _print_clone(report, as_json: bool) -> int:
    if as_json:
        _print_json(report.to_dict())
    else:
        print(report.summary())
    return 0 if report.ok else 4


def cmd_clone(args) -> int:
    from kit import clone

    source, targets = _clone_paths(args)
    report = clone.clone(source, targets, on_progress=None if args.json else JobProgress())
    return _print_clone(report, args.json)


def cmd_update(args) -> int:
    from kit import clone

    report = clone.update(_source_stick(args.source), [Path(p) for p in args.paths], allow_older=args.allow_older,
                          on_progress=None if args.json else JobProgress())
    return _print_clone(report, args.json)


def cmd_keygen(args) -> int:
    from kit import signing

    private = Path(args.private_key).expanduser()
    public = Path(args.public_key).expanduser() if args.public_key else private.with_name(private.name + ".pub")
    fp = signing.keygen(private, public)
    print(f"private key: {private} (keep it off the stick; anyone holding it can sign sticks as you)\n"
          f"public key:  {public}\nfingerprint: {fp}")
    return 0


def cmd_lock(args) -> int:
    _needs_python_install("lock")
    from kit.builder.lock import lock_profile

    changes = lock_profile(Path(args.profile))
    print("\n".join(changes) if changes else "already locked: nothing changed")
    return 0


def cmd_bench(args) -> int:
    """bench/run.py of the source checkout: it builds llama.cpp's own tools to compare with."""
    _needs_python_install("bench")
    import subprocess

    script = Path(__file__).resolve().parents[1] / "bench" / "run.py"
    if not script.is_file():
        raise KitError("`kit bench` needs the kit's source checkout (bench/ is not installed)",
                       "run it from a clone of the project: .venv/bin/kit bench")
    forwarded = ["--quick"] if args.quick else []
    for option in ("only", "stick", "variant", "json"):
        if getattr(args, option) is not None:
            forwarded.append(f"--{option}={getattr(args, option)}")
    return subprocess.call([sys.executable, str(script), *forwarded])


def cmd_probe(args) -> int:
    from kit import kernels

    return kernels.probe_child(Path(args.variant), Path(args.model), args.blake3, args.threads, serve=args.serve)


def cmd_gpu_probe(args) -> int:
    from kit import gpuprobe

    return gpuprobe.probe_child_main(args)


# ---------------------------------------------------------------- parser

def _add_stick(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stick", metavar="DIR", help="the stick (folder holding KIT/); "
                   "default: KIT_BUNDLE, the stick this runtime is on, or the stick the current folder is in")


def _add_overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="model id to use instead of the best fit")
    p.add_argument("--ctx", type=int, help="context length in tokens")
    p.add_argument("--threads", type=int, help="CPU threads")
    p.add_argument("--gpu-layers", type=int, help="layers to offload to the GPU (0 = CPU only)")


def _add_no_knowledge(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-knowledge", action="store_true",
                   help="answer from the model alone, without the stick's documents and archives as sources")


def _add_pool(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--pool", metavar="HOST:PORT,...", help=what)


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = 0
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port: give a number from 1 to 65535")
    return port


def _worker_port(text: str) -> int:
    port = _port(text)
    if port == 65535:
        raise argparse.ArgumentTypeError("65535 has no next port for the worker's facts: give 1 to 65534")
    return port


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kit", description="Survival Kit: a verified, offline LLM on a stick.")
    parser.add_argument("--version", action="version", version=f"kit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("verify", help="check every file of a stick against its manifest")
    p.add_argument("stick", nargs="?", help="the stick (default: KIT_BUNDLE, this runtime's stick, "
                   "or the stick the current folder is in)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--key", metavar="PUB", help="require a valid signature by this public key (a .pub file)")
    p.add_argument("--fingerprint", metavar="FP", help="require a valid signature by the key with this fingerprint")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("doctor", help="show the host, the CPU kernel probe and the launch plan")
    _add_stick(p)
    _add_overrides(p)
    p.add_argument("--refresh", action="store_true", help="probe the CPU kernels again")
    p.add_argument("--serve", action="store_true", help="show the plan of `kit serve`: its slots and why")
    p.add_argument("--parallel", type=int, metavar="N", help="with --serve: plan for N slots")
    _add_pool(p, "plan kit serve with these pool workers' memory")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("ask", help="ask one question and stream the answer")
    p.add_argument("question", nargs="+")
    _add_stick(p)
    _add_overrides(p)
    p.add_argument("--preset", help="system prompt preset id from the stick (default: the stick's first, "
                   "as in the chat; 'none' for no system prompt)")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS)
    p.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE,
                   help="0 = always the most likely word (repeatable)")
    p.add_argument("-q", "--quiet", action="store_true", help="no statistics line")
    _add_no_knowledge(p)
    _add_pool(p, "run the model across these pool workers (kit pool worker)")
    p.set_defaults(func=cmd_ask)

    p = sub.add_parser("chat", help="open the chat")
    _add_stick(p)
    _add_overrides(p)
    _add_no_knowledge(p)
    _add_pool(p, "run the model across these pool workers (kit pool worker)")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("search", help="search the stick's knowledge: ranked passages with their sources "
                       "(no model needed)")
    p.add_argument("query", nargs="+")
    _add_stick(p)
    p.add_argument("--limit", type=int, default=5, help="how many passages (default 5)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("serve", help="serve the model to a team: browser page and OpenAI-compatible API",
                       description="Starts llama.cpp's llama-server on the verified model. Loopback only unless "
                       "--lan, which always needs a key. Ctrl+C stops it.")
    _add_stick(p)
    _add_overrides(p)
    p.add_argument("--port", type=_port, default=8080, help="TCP port, 1-65535 (default 8080)")
    p.add_argument("--lan", action="store_true", help="open it to the local network (then a key is required)")
    p.add_argument("--parallel", type=int, metavar="N", help="people answered at once (default: as many as fit, "
                   "up to 4); --ctx is each one's context")
    p.add_argument("--key-file", metavar="FILE", help="the key, one line of 16+ characters (default with --lan: "
                   "a new random key each start)")
    p.add_argument("--keep-key", action="store_true", help="with --lan: keep the key in the stick's state and "
                   "use it again next time")
    _add_pool(p, "run the model across these pool workers (kit pool worker); without them if one stops")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("pool", help="lend this computer's memory to a lead (kit pool worker)")
    pool_sub = p.add_subparsers(dest="pool_command", metavar="COMMAND", required=True)
    p = pool_sub.add_parser("worker", help="offer this computer's memory and CPU to a lead over the network",
                            description="Starts llama.cpp's rpc-server on one address. It has no password: "
                            "use it only on the team's own network. Ctrl+C stops it.")
    _add_stick(p)
    p.add_argument("--bind", required=True, metavar="ADDR", help="this computer's IPv4 address on the team's "
                   "network (never every interface, unless --i-trust-this-network)")
    p.add_argument("--port", type=_worker_port, default=50052, help="rpc-server's port (default 50052); the "
                   "kit's facts port is the next one")
    p.add_argument("--memory", type=_size, metavar="SIZE", help="at most this much (e.g. 3G; default: what "
                   "this computer can lend)")
    p.add_argument("--threads", type=int, metavar="N", help="CPU threads for the layers this worker holds "
                   "(default: one per physical core)")
    p.add_argument("--i-trust-this-network", action="store_true", help="allow --bind 0.0.0.0")
    p.set_defaults(func=cmd_pool_worker)

    p = sub.add_parser("build", help="build a stick from a profile")
    p.add_argument("--profile", required=True, help="manifests/<name>.toml")
    p.add_argument("--target", required=True, help="folder to build the stick in (e.g. a mounted stick)")
    p.add_argument("--max-file-size", type=int, help="split models into GGUF shards and Kiwix archives into "
                   ".zimaa/.zimab parts above this many bytes")
    p.add_argument("--runtime", action="append", default=[], metavar="PATH",
                   help="import a runtime built on another OS/arch (folder or archive); repeatable")
    p.add_argument("--no-freeze", action="store_true", help="do not freeze a runtime for this host")
    p.add_argument("--platform", action="append", default=[], metavar="P",
                   help="freeze a runtime for P here (repeatable; default: this computer's). On x86_64 Linux: "
                   "linux-x86_64 and linux-arm64 (as root; the first arm64 build takes ~15 min)")
    p.add_argument("--sign", metavar="KEY", help="sign bundle.json with this private key (from `kit keygen`)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("clone", help="copy a stick to one or more others, verified (offline)",
                       description="kit clone SRC DST [DST ...]: SRC is checked whole first; each source file is "
                       "read once and written to every DST; each DST is verified. From a stick "
                       "(START-linux.sh clone DST ...) the source is that stick. Run it again to finish "
                       "a clone that was stopped.")
    p.add_argument("paths", nargs="+", metavar="PATH", help="SRC then DST ... (from a stick's launcher: DST ...)")
    p.add_argument("--from", dest="source", metavar="SRC", help="the source stick; then every PATH is a target")
    p.add_argument("--json", action="store_true", help="print the final report as JSON")
    p.set_defaults(func=cmd_clone)

    p = sub.add_parser("update", help="bring older sticks up to a newer one: copy only what differs (offline)")
    p.add_argument("paths", nargs="+", metavar="DST", help="the stick(s) to bring up to date")
    p.add_argument("--from", dest="source", metavar="SRC",
                   help="the newer stick (default: KIT_BUNDLE, or the stick this runtime is on)")
    p.add_argument("--allow-older", action="store_true", help="go back to an older stick on purpose")
    p.add_argument("--json", action="store_true", help="print the final report as JSON")
    p.set_defaults(func=cmd_update)

    p = sub.add_parser("keygen", help="create an ed25519 key pair for signing sticks")
    p.add_argument("private_key", help="where to write the private key (0600; never on a stick)")
    p.add_argument("--public-key", metavar="PUB", help="where to write the public key (default: PRIVATE_KEY.pub)")
    p.set_defaults(func=cmd_keygen)

    p = sub.add_parser("lock", help="pin revisions and hashes of a profile's models (needs network)")
    p.add_argument("profile")
    p.set_defaults(func=cmd_lock)

    p = sub.add_parser("bench", help="measure the kit against llama.cpp itself (bench/run.py; source checkout)")
    p.add_argument("--quick", action="store_true", help="smoke run: fewer repeats")
    p.add_argument("--only", metavar="SECTIONS", help="overhead,kernels,verify,first-token,footprint")
    p.add_argument("--stick", metavar="DIR", help="a stick with a frozen runtime (default: build one)")
    p.add_argument("--variant", help="CPU kernel for the overhead and verification sections")
    p.add_argument("--json", metavar="FILE", help="also write every number as JSON")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("_probe", help=argparse.SUPPRESS)
    p.add_argument("--variant", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--blake3", required=True)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--serve", action="store_true", help="answer commands read on stdin (kernels.ProbeChild)")
    p.set_defaults(func=cmd_probe)

    p = sub.add_parser("_gpu-probe", help=argparse.SUPPRESS)  # kit.gpuprobe's children
    p.add_argument("--list", action="store_true", help="list the Vulkan devices")
    p.add_argument("--device", type=int, help="probe this Vulkan device (the loader's numbering)")
    p.add_argument("--kernel", help="the chosen CPU kernel library")
    p.add_argument("--backend", help="the Vulkan backend library")
    p.add_argument("--loader", help="the runtime's own Vulkan loader, for a host without one")
    p.add_argument("--model")
    p.add_argument("--blake3")
    p.add_argument("--threads", type=int, default=1)
    p.set_defaults(func=cmd_gpu_probe)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        if getattr(sys, "frozen", False):  # the stick's launcher with no arguments: open the chat
            args = parser.parse_args(["chat"])
        else:
            parser.print_help()
            return 2
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("\nkit: stopped", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception as err:  # every error ends as one sentence and a fix, never a bare traceback
        if debug_enabled():
            traceback.print_exc()
        what, fix, code = describe_error(err)
        print(f"kit: {what}\n  what to do: {fix}", file=sys.stderr)
        return code

