"""What sits at the stick's root beside KIT/: README.txt and the three launchers.

They sit outside KIT/ because a person reads and starts them before anything can be verified;
bundle.json lists them (root_files) so that `kit verify` checks them and the runtime warns when
the launcher that started it was changed. README.txt says how to check the rest by hand.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

from kit.errors import BuildError
from kit.manifest import BundleManifest, KnowledgeEntry
from kit.medium import LAUNCHERS, README_NAME, write_root_file
from kit.paths import KIT_DIRNAME, runtime_glibc
from kit.units import human_bytes

LAUNCHER_DIR = Path(__file__).resolve().parents[2] / "launchers"
WIDTH = 76


def write_stick_texts(target: Path, manifest: BundleManifest) -> None:
    """README.txt and the launchers at the stick's root, each written atomically."""
    glibc = linux_glibc_floor(target / KIT_DIRNAME, manifest)
    readme = readme_text(manifest, glibc).replace("\n", "\r\n")  # Notepad is the likeliest reader
    write_root_file(target, README_NAME, readme.encode("utf-8"))
    for name, newline in LAUNCHERS.items():
        write_root_file(target, name, launcher_bytes(LAUNCHER_DIR / name, newline))


def launcher_bytes(source: Path, newline: str) -> bytes:
    """A launcher from launchers/ with the line ending its OS needs (kit.medium.LAUNCHERS)."""
    try:
        text = source.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BuildError(f"the launcher {source} is missing", "build from a source checkout of the kit") from None
    return newline.join(text.replace("\r\n", "\n").split("\n")).encode("utf-8")


def linux_glibc_floor(kit_dir: Path, manifest: BundleManifest) -> str | None:
    """The newest glibc any file of the Linux runtimes asks for (their kit-runtime.json), if known."""
    versions = [runtime_glibc(kit_dir / r.folder) for r in manifest.runtimes if r.platform.startswith("linux-")]
    versions = [v for v in versions if v]
    return max(versions, key=_version_key) if versions else None


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) if part.isdigit() else 0 for part in version.split("."))


# ---------------------------------------------------------------- README.txt

def readme_text(manifest: BundleManifest, glibc: str | None = None) -> str:
    sections = [_header(manifest), _how_to_start(manifest, glibc), _troubleshooting(),
                _check_by_hand(), _models(manifest)]
    if manifest.knowledge:
        sections.append(_knowledge(manifest))
    sections.append(_footer(manifest))
    return "\n\n".join(sections) + "\n"


def _para(text: str, indent: str = "") -> str:
    return textwrap.fill(" ".join(text.split()), WIDTH, initial_indent=indent, subsequent_indent=indent)


def _title(text: str) -> str:
    return f"{text}\n{'-' * len(text)}"


def _header(manifest: BundleManifest) -> str:
    title = "SURVIVAL KIT - an AI assistant that runs from this stick, offline"
    return "\n\n".join([
        f"{title}\n{'=' * len(title)}",
        _para("This stick holds a language model (an AI that answers questions in writing) and the "
              "program that runs it. It works on a laptop with no internet, installs nothing and "
              "leaves nothing on the computer: the chat history is kept on the stick when the stick "
              "is writable, and nowhere otherwise. Answers can be wrong: check anything that matters."),
        f'Profile "{manifest.profile}", built {manifest.created} by kit {manifest.kit_version}.',
    ])


def _how_to_start(manifest: BundleManifest, glibc: str | None) -> str:
    platforms = ", ".join(r.platform for r in manifest.runtimes) or "none (built without a runtime)"
    lines = [
        _title("HOW TO START"),
        "  Windows:  double-click START-windows.bat",
        "  macOS:    double-click START-macos.command  (if macOS refuses it, see below)",
        "  Linux:    open a terminal in this folder and run:  sh START-linux.sh",
        "",
        _para("The chat opens in a terminal window. Words after the launcher's name go to the kit "
              "itself, for example:"),
        '  sh START-linux.sh ask "How do I purify water?"     one answer, as plain text',
        "  sh START-linux.sh verify                           check every file of the stick",
        "  sh START-linux.sh doctor                           what this computer can run",
        "  sh START-linux.sh serve --lan                      serve phones and laptops nearby (Linux)",
        "  sh START-linux.sh pool worker --bind 192.168.1.20  lend this laptop's memory to a lead, which",
        "                                                     runs: serve --pool 192.168.1.20:50052 (Linux;",
        "                                                     no password: the team's own network only)",
        "  sh START-linux.sh --help                           everything else",
        "(on Windows: START-windows.bat ask \"...\", and so on).",
        "",
        f"This stick has programs for: {platforms}.",
    ]
    if glibc:
        lines.append(f"Linux needs glibc {glibc} or newer (`ldd --version` shows yours).")
    lines += ["", _para("The programs on this stick are free software; each runtime folder, "
                        "KIT/runtimes/<kind of computer>/, holds THIRD-PARTY-NOTICES.txt with the "
                        "licence of everything in it.")]
    return "\n".join(lines)


def _troubleshooting() -> str:
    return _title("IF IT DOES NOT START") + "\n" + "\n\n".join([
        '"Permission denied", or "cannot be started ... noexec" (Linux):\n' + _para(
            "the stick is probably formatted FAT32, and Linux runs no program from a FAT32 stick. "
            "Either copy the whole stick folder to the laptop and start it from the copy, or "
            "reformat the stick as exFAT (which keeps permissions) and build it again.", "  "),
        'macOS says the program "cannot be opened", "is damaged", or comes from an\n'
        '"unidentified developer":\n' + _para(
            "macOS Gatekeeper blocks programs that were downloaded or come from another computer "
            "(this one is not notarised by Apple). Open Terminal and run the command below, with the "
            "stick's folder in place of STICK (drag the folder onto the Terminal window to type it), "
            "then start again:", "  ")
        + "\n      xattr -dr com.apple.quarantine STICK\n"
        + _para("If START-macos.command itself will not open: right-click it, choose Open, then Open.", "  "),
        'Windows says "Windows protected your PC":\n'
        + _para('click "More info", then "Run anyway".', "  "),
        '"this stick has no runtime for ...":\n' + _para(
            "the stick was built without a program for this kind of computer; the message lists the "
            "kinds it has.", "  "),
    ])


def _check_by_hand() -> str:
    return "\n".join([
        _title("CHECK THE STICK BY HAND"),
        _para("Every file under KIT/ is listed with its BLAKE3 and SHA-256 hash in KIT/B3SUMS and "
              "KIT/SHA256SUMS. The launchers and this README are listed in KIT/bundle.json "
              "(root_files), which `verify` checks; a changed launcher can lie about that, so "
              "check the stick from a kit you trust. In a terminal, from inside the KIT folder:"),
        "      cd KIT",
        "      b3sum -c B3SUMS                    (b3sum: github.com/BLAKE3-team/BLAKE3)",
        "      sha256sum -c SHA256SUMS            (Linux)",
        "      shasum -a 256 -c SHA256SUMS        (macOS)",
        "  Windows PowerShell, one file at a time:",
        "      Get-FileHash -Algorithm SHA256 models\\<model>\\<file>.gguf",
        _para("Every line must end in OK (on Windows, the hash must equal the file's line in "
              "SHA256SUMS). The kit also checks each model before it loads it, and `verify` "
              "checks every file."),
    ])


def _models(manifest: BundleManifest) -> str:
    lines = [_title("MODELS ON THIS STICK")]
    for model in manifest.models:
        params = f"{model.params / 1e9:.1f}B" if model.params >= 1e9 else f"{model.params / 1e6:.0f}M"
        size = human_bytes(manifest.model_size(model))
        lines.append(f"  {model.name} (id {model.id}): {params} parameters, {model.quant}, {size}")
        lines.append(f"    licence: {model.licence}")
    return "\n".join(lines)


KNOWLEDGE_KINDS = {"docs": "documents, indexed for search", "zim": "Kiwix archive (ZIM)"}


def _knowledge(manifest: BundleManifest) -> str:
    lines = [_title("KNOWLEDGE ON THIS STICK"),
             _para("Sources the assistant searches and cites in its answers. Each has its own licence; "
                   "a source is only as good as its authors, so check anything that matters."), ""]
    for entry in manifest.knowledge:
        size = human_bytes(manifest.knowledge_size(entry))
        lines += [_hanging(f"{entry.name} (id {entry.id})", "  "),
                  _hanging(f"{KNOWLEDGE_KINDS[entry.kind]}: {_knowledge_facts(entry)}, {size}"),
                  _hanging(f"licence: {entry.licence}"),
                  f"    language: {entry.language}",
                  _hanging(f"files: {_knowledge_files(entry)}")]
    if any(e.kind == "zim" for e in manifest.knowledge):
        lines += ["", _para("A Kiwix archive (.zim) also opens in a Kiwix reader (kiwix.org). One cut into "
                            "parts (.zimaa, .zimab, ...) for FAT32 is whole again once they are joined in "
                            "order, for example on Linux or macOS: cat NAME.zim?? > NAME.zim")]
    return "\n".join(lines)


def _hanging(text: str, indent: str = "    ") -> str:
    """`text` wrapped at `indent`, its following lines two spaces further in."""
    return textwrap.fill(text, WIDTH, initial_indent=indent, subsequent_indent=indent + "  ")


def _knowledge_facts(entry: KnowledgeEntry) -> str:
    facts = entry.facts
    if entry.kind == "docs":
        return f"{facts.get('passages', 0):,} passages from {facts.get('documents', 0):,} documents"
    parts = int(facts.get("parts", 1))
    return f"{facts.get('articles', 0):,} articles" + (f" in {parts} parts" if parts > 1 else "")


def _knowledge_files(entry: KnowledgeEntry) -> str:
    """Its folder under KIT/ and the files in it (a long run of archive parts as first to last)."""
    folder = f"knowledge/{entry.id}/"
    names = [f.removeprefix(folder) for f in entry.files]
    opened, others = names[: len(entry.opened)], names[len(entry.opened):]
    if entry.kind == "docs":
        opened = [f"{opened[0]} (the search index)"]
    elif len(opened) > 3:
        opened = [f"{opened[0]} to {opened[-1]}"]
    return f"in {KIT_DIRNAME}/{folder}: " + ", ".join(opened + others)


def _footer(manifest: BundleManifest) -> str:
    return f"Survival Kit {manifest.kit_version}, stick built {manifest.created}."
