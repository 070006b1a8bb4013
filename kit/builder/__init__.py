"""`kit build`: profile → a complete stick, or one that says it is incomplete.

Models, then knowledge (kit.builder.knowledge: document indexes and Kiwix archives), then runtimes.
Order matters for crash safety: INCOMPLETE marker first, then files (each atomic and resumable),
then README.txt and the launchers (hashed into bundle.json's root_files), the hand-check sums,
bundle.json and (when signing) bundle.json.sig + signer.pub, and only then the marker goes
(kit.medium.begin and seal: the order `kit clone` keeps too).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from kit import __version__, medium
from kit.builder import stage
from kit.builder.cache import default_cache_dir, sources_cache
from kit.errors import BuildError
from kit.integrity import ByteMeter, ProgressFn, hash_file
from kit.manifest import BundleManifest, FileEntry, KnowledgeEntry, ModelEntry, RuntimeEntry, load_profile
from kit.paths import KIT_DIRNAME, BundlePaths
from kit.units import human_bytes

Report = Callable[[str], None]


@dataclass
class BuildResult:
    target: Path
    manifest: BundleManifest
    copied: int = 0
    kept: int = 0
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)
    signer: str | None = None  # the signing key's fingerprint (kit.signing), or None: unsigned

    def total_bytes(self) -> int:
        return sum(f.size for f in self.manifest.files)

    def to_dict(self) -> dict:
        return {"target": str(self.target), "files": len(self.manifest.files),
                "bytes": self.total_bytes(), "copied": self.copied, "kept": self.kept,
                "seconds": round(self.seconds, 2), "warnings": self.warnings,
                "signer": self.signer or "unsigned",
                "models": [m.id for m in self.manifest.models],
                "knowledge": [k.id for k in self.manifest.knowledge],
                "runtimes": [r.platform for r in self.manifest.runtimes]}

    def summary(self) -> str:
        lines = [f"stick ready at {self.target}: {len(self.manifest.files)} files, "
                 f"{human_bytes(self.total_bytes())} ({self.copied} copied, {self.kept} already there) "
                 f"in {self.seconds:.1f} s",
                 f"models: {', '.join(m.id for m in self.manifest.models)}",
                 *self._knowledge_line(),
                 f"runtimes: {', '.join(r.platform for r in self.manifest.runtimes) or 'none'}",
                 f"signed by: {self.signer}" if self.signer else "unsigned (sign with --sign KEY)"]
        return "\n".join(lines + [f"warning: {w}" for w in self.warnings])

    def _knowledge_line(self) -> list[str]:
        """One line naming the knowledge sources; none for a stick without (its summary reads as before)."""
        ids = [k.id for k in self.manifest.knowledge]
        return [f"knowledge: {', '.join(ids)}"] if ids else []


def build(profile_path: Path, target: Path, *, max_file_size: int | None = None,
          runtimes: list[Path] = (), freeze: bool = True, platforms: list[str] = (),
          sign_key: Path | None = None, report: Report = lambda s: None,
          progress: ProgressFn | None = None) -> BuildResult:
    from kit import signing
    from kit.builder import sources
    from kit.builder.knowledge import check_knowledge, stage_knowledge
    from kit.builder.sticktext import write_stick_texts

    start = time.monotonic()
    private_key = None
    if sign_key is not None:  # before any copying: a bad key fails the build at once
        signing.refuse_on_stick(sign_key, target)
        private_key = signing.load_private_key(sign_key)
    platforms = _platforms_to_freeze(platforms, freeze)
    profile = load_profile(profile_path)
    parsed = [(m, sources.parse_source(m.source, profile_dir=profile_path.parent)) for m in profile.models]
    for k in profile.knowledge:  # an unpinned url or a missing folder fails before the stick is touched
        check_knowledge(k, profile_path.parent)
    stick = BundlePaths(target, target / KIT_DIRNAME)
    kit_dir = stick.kit
    result_warnings: list[str] = []

    if medium.is_fat32(medium.filesystem_type(medium.existing_ancestor(target))):
        result_warnings.append("the target is FAT32: large models are split into shards, and Linux "
                               "will not run programs from it; exFAT is the better format for a stick")
        max_file_size = min(max_file_size or medium.FAT32_MAX_FILE, medium.FAT32_MAX_FILE)
    if max_file_size is not None and max_file_size < 1 << 20:
        raise BuildError(f"--max-file-size {max_file_size} is too small", "use at least 1048576 (1 MiB)")

    medium.begin(stick, "build")
    cache = default_cache_dir()
    copied = kept = 0
    files: list[FileEntry] = []
    models: list[ModelEntry] = []

    for model, source in parsed:
        report(f"model {model.id}: fetching")
        fetched = sources.fetch(source, sources_cache(cache))
        shards, extras, n_copied = _stage_model(model.id, fetched, kit_dir, cache, max_file_size, report,
                                                progress)
        copied += n_copied
        kept += len(shards) + len(extras) - n_copied
        files += shards + extras
        models.append(_model_entry(model, [e.path for e in shards], kit_dir))

    knowledge: list[KnowledgeEntry] = []
    for source in profile.knowledge:
        report(f"knowledge {source.id}: preparing {source.name}")
        entry, entries, n_copied = stage_knowledge(source, profile_path.parent, kit_dir, cache, max_file_size,
                                                   report, progress)
        copied += n_copied
        kept += len(entries) - n_copied
        files += entries
        knowledge.append(entry)

    runtime_entries: list[RuntimeEntry] = []
    runtime_dirs = _runtimes(runtimes, platforms, cache, report)
    for rt in runtime_dirs:
        entries, n_copied = stage.stage_tree(rt.folder, kit_dir, f"runtimes/{rt.platform}")
        files += entries
        copied += n_copied
        kept += len(entries) - n_copied
        runtime_entries.append(RuntimeEntry(rt.platform, f"runtimes/{rt.platform}/{rt.entry}"))

    keep = {f.path for f in files}
    for under in ("models", "knowledge", "runtimes"):
        stage.remove_stale(kit_dir, keep, under)

    manifest = BundleManifest(kit_version=__version__, created=medium.utc_now(), profile=profile.name,
                              models=tuple(models), runtimes=tuple(runtime_entries), files=tuple(files),
                              presets=profile.presets, knowledge=tuple(knowledge))
    write_stick_texts(target, manifest)
    # README.txt says nothing of root_files, so listing it after writing it is no circle
    manifest = dataclasses.replace(manifest, root_files=_root_entries(target))
    raw = manifest.to_json()
    if private_key is None:
        signer, write_signature = None, signing.remove_signature
    else:
        signer = signing.fingerprint(private_key.verify_key)
        write_signature = functools.partial(signing.write_signature, bundle_json=raw, private_key=private_key)
    medium.seal(stick, manifest, raw, write_signature)
    return BuildResult(target, manifest, copied, kept, time.monotonic() - start, result_warnings, signer)


def _root_entries(target: Path) -> tuple[FileEntry, ...]:
    """The launchers and README.txt just written beside KIT/, hashed for bundle.json."""
    entries = []
    for name in medium.ROOT_FILES:
        digest = hash_file(target / name, sha256=True)
        entries.append(FileEntry(name, digest.size, digest.blake3, digest.sha256))
    return tuple(entries)


def _platforms_to_freeze(platforms: list[str], freeze: bool) -> list[str]:
    """The platforms to freeze runtimes for here: --platform's (checked before the stick is touched),
    else this host's; none with --no-freeze."""
    from kit.builder.freeze import check_can_freeze, host_platform

    if not freeze:
        if platforms:
            raise BuildError("--no-freeze and --platform contradict each other", "drop one of them")
        return []
    for name in platforms:
        check_can_freeze(name)
    return list(dict.fromkeys(platforms)) or [host_platform()]


def _runtimes(imported: list[Path], platforms: list[str], cache: Path, report: Report) -> list:
    """Runtimes built elsewhere (checked against their own hash lists), then those frozen here for
    platforms, but for a platform an imported runtime already covers (one runtime per platform)."""
    from kit.builder.freeze import freeze_runtime, host_platform, import_runtime

    found = [import_runtime(path, cache / "imported") for path in imported]
    have = [rt.platform for rt in found]
    duplicate = next((p for p in have if have.count(p) > 1), None)
    if duplicate:
        raise BuildError(f"two runtimes given for {duplicate}", "pass one --runtime per platform")
    for name in platforms:
        if name in have:
            report(f"using the imported {name} runtime instead of freezing one here")
        else:
            work = cache / ("freeze" if name == host_platform() else f"freeze-{name}")  # PyInstaller's cache
            found.append(freeze_runtime(work, report=report, platform_name=name))
    return found


def _stage_model(model_id: str, fetched, kit_dir: Path, cache: Path, max_file_size: int | None,
                 report: Report, progress: ProgressFn | None) -> tuple[list[FileEntry], list[FileEntry], int]:
    """Copy a model (split into shards when it is too big for the medium) onto the stick,
    with the licence texts its source ships (they go beside it, in the manifest too)."""
    src = fetched.path
    parts = [src]
    if max_file_size is not None and src.stat().st_size > max_file_size:
        from kit.builder.split import split_gguf

        report(f"model {model_id}: splitting into shards of at most {max_file_size} bytes")
        parts = split_gguf(src, cache / "shards" / model_id, max_file_size)
    entries, extras, copied = [], [], 0
    for part in parts:
        digest = hash_file(part, sha256=True)
        relpath = f"models/{model_id}/{part.name}"
        meter = ByteMeter(digest.size, progress)  # the bytes copied to (or checked on) the stick
        entry, did_copy = stage.stage_file(part, kit_dir, relpath, source_digest=digest,
                                           on_block=meter.file(relpath, digest.size))
        report(f"model {model_id}: {part.name} {'copied' if did_copy else 'already on the stick'}")
        entries.append(entry)
        copied += did_copy
    for name, path in sorted(fetched.extra_files.items()):
        entry, did_copy = stage.stage_file(path, kit_dir, f"models/{model_id}/{name}",
                                           source_digest=hash_file(path, sha256=True))
        extras.append(entry)
        copied += did_copy
    return entries, extras, copied


def _model_entry(model, paths: list[str], kit_dir: Path) -> ModelEntry:
    """Facts for the planner come from the staged, hashed GGUF and go into the manifest, so the
    runtime can plan without parsing a model it has not verified yet."""
    from kit.builder.templates import refuse_unsafe_template
    from kit.ggufmeta import read_facts

    facts = read_facts([kit_dir.joinpath(*p.split("/")) for p in paths])
    refuse_unsafe_template(model.id, facts)
    return ModelEntry(id=model.id, name=model.name, files=tuple(paths), quant=facts.quant,
                      params=facts.n_params, context_length=facts.n_ctx_train, licence=model.licence,
                      chat_format=model.chat_format, facts=facts.to_dict())
