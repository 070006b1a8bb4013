"""Profiles (manifests/*.toml, what to build) and bundle.json (what a stick holds).

Loading either validates it completely; nothing half-checked leaves this module.
Paths in bundle.json are relative to KIT/, '/'-separated, normalised and inside KIT/; the one
exception is `root_files`, a fixed list of names at the stick's root (README.txt, the launchers).
"""

from __future__ import annotations

import json
import posixpath
import re
import stat
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from kit.errors import IncompleteBundleError, ManifestError, UnsafePathError
from kit.paths import BundlePaths

SCHEMA_VERSION = 1
MAX_FILE_SIZE = 1 << 40  # 1 TiB: no model file on a stick is larger; a bigger claim is hostile
MAX_ENTRIES = 100_000
_ID = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_PLATFORM = re.compile(r"^(linux|macos|windows)-(x86_64|arm64)$")
# Files beside bundle.json that it cannot describe (they describe it) and run-time state.
MANIFEST_COMPANIONS = ("bundle.json", "bundle.json.sig", "signer.pub", "B3SUMS", "SHA256SUMS")
STATE_DIRNAME = "state"
# The only files outside KIT/ a manifest may name: read and started before anything else, so
# they are hashed too (kit verify, and the start-up check of the launcher that ran).
ROOT_FILE_NAMES = ("README.txt", "START-linux.sh", "START-macos.command", "START-windows.bat")


# ---------------------------------------------------------------- paths

def check_relpath(value: Any, what: str = "path") -> str:
    """A manifest path: relative, '/'-separated, normalised, no '..', no NUL, inside KIT/."""
    if not isinstance(value, str) or not value:
        raise UnsafePathError(f"{what} must be a non-empty string, got {value!r}")
    if "\\" in value or "\x00" in value or value.startswith("/") or re.match(r"^[A-Za-z]:", value):
        raise UnsafePathError(f"{what} {value!r} is absolute or not a '/'-separated path")
    if posixpath.normpath(value) != value or value.split("/")[0] in ("..", "."):
        raise UnsafePathError(f"{what} {value!r} is not normalised or leaves KIT/")
    if ".." in value.split("/"):
        raise UnsafePathError(f"{what} {value!r} leaves KIT/")
    if value.split("/")[0] == STATE_DIRNAME or value in MANIFEST_COMPANIONS:
        raise UnsafePathError(f"{what} {value!r} names a reserved place")
    return value


def check_root_name(value: Any, what: str = "root file") -> str:
    """A file at the stick's root: exactly one of ROOT_FILE_NAMES; every other place outside KIT/ is refused."""
    if value not in ROOT_FILE_NAMES:
        raise UnsafePathError(f"{what} {value!r} is outside KIT/ and not one of the stick's root files "
                              f"({', '.join(ROOT_FILE_NAMES)})")
    return value


def open_checked(kit_dir: Path, relpath: str) -> Path:
    """The real path of a manifest file, refusing links, devices, FIFOs on the way.

    Returns the path; a missing file raises FileNotFoundError for the caller to report.
    """
    current = kit_dir
    parts = relpath.split("/")
    for i, part in enumerate(parts):
        current = current / part
        st = current.lstat()  # FileNotFoundError propagates: "missing" is a verdict, not an attack
        if stat.S_ISLNK(st.st_mode):
            raise UnsafePathError(f"{relpath} is a link on the stick; links are never followed")
        last = i == len(parts) - 1
        if last and not stat.S_ISREG(st.st_mode):
            raise UnsafePathError(f"{relpath} is not a regular file (device, FIFO or folder)")
        if not last and not stat.S_ISDIR(st.st_mode):
            raise UnsafePathError(f"{'/'.join(parts[: i + 1])} is not a folder")
    return current


# ---------------------------------------------------------------- typed field readers

def _req(data: dict, key: str, typ: type | tuple[type, ...], where: str) -> Any:
    if key not in data:
        raise ManifestError(f"{where}: missing field {key!r}")
    value = data[key]
    if isinstance(value, bool) and typ is not bool:  # bool is an int subclass; never accept it
        raise ManifestError(f"{where}: field {key!r} must be {_tname(typ)}, got {value!r}")
    if not isinstance(value, typ):
        raise ManifestError(f"{where}: field {key!r} must be {_tname(typ)}, got {value!r}")
    return value


def _opt(data: dict, key: str, typ: type | tuple[type, ...], where: str, default: Any = None):
    return default if data.get(key) is None else _req(data, key, typ, where)


def _tname(typ: type | tuple[type, ...]) -> str:
    types = typ if isinstance(typ, tuple) else (typ,)
    return " or ".join({"str": "a string", "int": "an integer", "list": "a list",
                        "dict": "a table", "bool": "true/false"}.get(t.__name__, t.__name__)
                       for t in types)


def _no_unknown(data: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ManifestError(f"{where}: unknown field {unknown[0]!r} (allowed: {', '.join(sorted(allowed))})")


def _check_id(value: str, where: str) -> str:
    if not _ID.match(value):
        raise ManifestError(f"{where}: id {value!r} must be lowercase letters, digits, '.', '_', '-'")
    return value


# ---------------------------------------------------------------- shared pieces

@dataclass(frozen=True)
class Preset:
    """A system prompt for field use, shipped by the profile (never hard-coded in the UI)."""

    id: str
    name: str
    system: str

    @classmethod
    def parse(cls, data: Any, where: str) -> Preset:
        if not isinstance(data, dict):
            raise ManifestError(f"{where}: must be a table")
        _no_unknown(data, {"id", "name", "system"}, where)
        return cls(_check_id(_req(data, "id", str, where), where), _req(data, "name", str, where),
                   _req(data, "system", str, where))


def _parse_presets(items: Any, where: str) -> tuple[Preset, ...]:
    if not isinstance(items, list):
        raise ManifestError(f"{where}: 'presets' must be a list")
    presets = tuple(Preset.parse(p, f"{where} preset {i + 1}") for i, p in enumerate(items))
    _refuse_duplicates([p.id for p in presets], f"{where}: preset id")
    return presets


def _refuse_duplicates(values: list[str], what: str) -> None:
    seen: set[str] = set()
    for value in values:
        if value in seen:
            raise ManifestError(f"{what} {value!r} appears twice")
        seen.add(value)


# ---------------------------------------------------------------- profile (manifests/*.toml)

@dataclass(frozen=True)
class ProfileModel:
    id: str
    name: str
    licence: str
    source: dict  # parsed and fetched by kit.builder.sources
    chat_format: str | None = None


KNOWLEDGE_KINDS = ("docs", "zim")
_LANGUAGE = re.compile(r"^[a-z]{2,3}(-[A-Za-z0-9]{2,8})*$")


@dataclass(frozen=True)
class ProfileKnowledge:
    """A `[[knowledge]]` entry: a folder of documents (`docs`, indexed at build time) or a Kiwix
    archive (`zim`, from a local `path` or a `url` pinned by `sha256`; `kit lock` pins it)."""

    id: str
    name: str
    kind: str
    licence: str
    language: str
    path: str | None = None
    url: str | None = None
    sha256: str | None = None

    @classmethod
    def parse(cls, data: Any, where: str) -> ProfileKnowledge:
        if not isinstance(data, dict):
            raise ManifestError(f"{where}: must be a table")
        _no_unknown(data, {"id", "name", "kind", "licence", "language", "path", "url", "sha256"}, where)
        kind = _req(data, "kind", str, where)
        if kind not in KNOWLEDGE_KINDS:
            raise ManifestError(f"{where}: kind {kind!r} is not one of {', '.join(KNOWLEDGE_KINDS)}")
        entry = cls(id=_check_id(_req(data, "id", str, where), where), name=_req(data, "name", str, where),
                    kind=kind, licence=_req(data, "licence", str, where),
                    language=_check_language(_req(data, "language", str, where), where),
                    path=_opt(data, "path", str, where), url=_opt(data, "url", str, where),
                    sha256=_opt(data, "sha256", str, where))
        if (entry.path is None) == (entry.url is None):
            raise ManifestError(f"{where}: give exactly one of 'path' and 'url'")
        if kind == "docs" and entry.url is not None:
            raise ManifestError(f"{where}: a docs source is a local folder: use 'path'")
        if entry.url is not None and not entry.url.startswith(("https://", "http://")):
            raise ManifestError(f"{where}: url {entry.url!r} must start with https://")
        if entry.sha256 is not None and not _HEX64.match(entry.sha256):
            raise ManifestError(f"{where}: sha256 must be 64 lowercase hex digits")
        return entry


def _check_language(value: str, where: str) -> str:
    if not _LANGUAGE.match(value):
        raise ManifestError(f"{where}: language {value!r} must be a language code such as 'en' or 'fr'")
    return value


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    models: tuple[ProfileModel, ...]
    presets: tuple[Preset, ...]
    path: Path
    knowledge: tuple[ProfileKnowledge, ...] = ()


def load_profile(path: Path) -> Profile:
    where = str(path)
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ManifestError(f"profile {path} does not exist", "pass one of manifests/*.toml") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{where} is not valid TOML: {exc}") from None
    _no_unknown(data, {"schema_version", "name", "description", "models", "presets", "knowledge"}, where)
    version = _req(data, "schema_version", int, where)
    if version != SCHEMA_VERSION:
        raise ManifestError(f"{where}: schema_version {version} is not supported (this kit reads {SCHEMA_VERSION})")
    models_raw = _req(data, "models", list, where)
    if not models_raw:
        raise ManifestError(f"{where}: lists no [[models]]")
    models = []
    for i, m in enumerate(models_raw):
        mw = f"{where} model {i + 1}"
        if not isinstance(m, dict):
            raise ManifestError(f"{mw}: must be a table")
        _no_unknown(m, {"id", "name", "licence", "chat_format", "source"}, mw)
        models.append(ProfileModel(
            id=_check_id(_req(m, "id", str, mw), mw), name=_req(m, "name", str, mw),
            licence=_req(m, "licence", str, mw), source=dict(_req(m, "source", dict, mw)),
            chat_format=_opt(m, "chat_format", str, mw)))
    _refuse_duplicates([m.id for m in models], f"{where}: model id")
    knowledge_raw = _opt(data, "knowledge", list, where, [])
    knowledge = tuple(ProfileKnowledge.parse(k, f"{where} knowledge {i + 1}") for i, k in enumerate(knowledge_raw))
    _refuse_duplicates([k.id for k in knowledge], f"{where}: knowledge id")
    return Profile(name=_req(data, "name", str, where), description=_opt(data, "description", str, where, ""),
                   models=tuple(models), presets=_parse_presets(data.get("presets", []), where),
                   path=Path(path), knowledge=knowledge)


# ---------------------------------------------------------------- bundle.json

@dataclass(frozen=True)
class FileEntry:
    path: str
    size: int
    blake3: str
    sha256: str

    @classmethod
    def parse(cls, data: Any, where: str, *, root: bool = False) -> FileEntry:
        """`root`: an entry of root_files, whose path is a name at the stick's root."""
        if not isinstance(data, dict):
            raise ManifestError(f"{where}: must be an object")
        _no_unknown(data, {"path", "size", "blake3", "sha256"}, where)
        check = check_root_name if root else check_relpath
        path = check(_req(data, "path", str, where), f"{where} path")
        size = _req(data, "size", int, where)
        if not 0 <= size <= MAX_FILE_SIZE:
            raise ManifestError(f"{where}: size {size} is absurd")
        hashes = [_req(data, k, str, where) for k in ("blake3", "sha256")]
        for key, value in zip(("blake3", "sha256"), hashes, strict=True):
            if not _HEX64.match(value):
                raise ManifestError(f"{where}: {key} must be 64 lowercase hex digits")
        return cls(path, size, *hashes)


@dataclass(frozen=True)
class ModelEntry:
    id: str
    name: str
    files: tuple[str, ...]  # in load order: the first is what llama.cpp opens (shard 1)
    quant: str
    params: int
    context_length: int
    licence: str
    chat_format: str | None = None  # fallback when the GGUF carries no chat template
    # kit.ggufmeta.ModelFacts as a dict, read at build time from the hashed file: the runtime
    # plans from these without parsing any model it has not verified yet.
    facts: dict = field(default_factory=dict, compare=False)

    def model_facts(self):
        from kit.ggufmeta import ModelFacts

        return ModelFacts.from_dict(self.facts)

    @classmethod
    def parse(cls, data: Any, where: str) -> ModelEntry:
        if not isinstance(data, dict):
            raise ManifestError(f"{where}: must be an object")
        _no_unknown(data, {f.name for f in fields(cls)}, where)
        files = _req(data, "files", list, where)
        if not files:
            raise ManifestError(f"{where}: lists no files")
        return cls(
            id=_check_id(_req(data, "id", str, where), where), name=_req(data, "name", str, where),
            files=tuple(check_relpath(f, f"{where} file") for f in files),
            quant=_req(data, "quant", str, where), params=_req(data, "params", int, where),
            context_length=_req(data, "context_length", int, where),
            licence=_req(data, "licence", str, where), chat_format=_opt(data, "chat_format", str, where),
            facts=_parse_facts(_req(data, "facts", dict, where), where))


def _parse_facts(data: dict, where: str) -> dict:
    from kit.ggufmeta import ModelFacts

    try:
        ModelFacts.from_dict(data)
    except (TypeError, ValueError, KeyError) as exc:
        raise ManifestError(f"{where}: facts are malformed ({exc})") from None
    return data


@dataclass(frozen=True)
class KnowledgeEntry:
    """Knowledge on the stick: `docs` (files: the passage index, then licence texts) or `zim`
    (files: the archive, or its parts in order, `name.zimaa`, `name.zimab`... as libzim reads
    them, then licence texts). Every file sits under knowledge/<id>/."""

    id: str
    name: str
    kind: str
    licence: str
    language: str
    files: tuple[str, ...]  # the first (docs) or the parts (zim) are what is opened
    # docs: {"passages": N, "documents": N}; zim: {"articles": N, "fulltext": bool, "parts": N}
    facts: dict = field(default_factory=dict, compare=False)

    @property
    def opened(self) -> tuple[str, ...]:
        """The files that are parsed: the index, or every part of the archive (not the licences)."""
        if self.kind == "docs":
            return self.files[:1]
        return self.files[: int(self.facts.get("parts", 1))]

    @classmethod
    def parse(cls, data: Any, where: str) -> KnowledgeEntry:
        if not isinstance(data, dict):
            raise ManifestError(f"{where}: must be an object")
        _no_unknown(data, {f.name for f in fields(cls)}, where)
        entry_id = _check_id(_req(data, "id", str, where), where)
        kind = _req(data, "kind", str, where)
        if kind not in KNOWLEDGE_KINDS:
            raise ManifestError(f"{where}: kind {kind!r} is not one of {', '.join(KNOWLEDGE_KINDS)}")
        files = tuple(check_relpath(f, f"{where} file") for f in _req(data, "files", list, where))
        if not files:
            raise ManifestError(f"{where}: lists no files")
        outside = next((f for f in files if not f.startswith(f"knowledge/{entry_id}/")), None)
        if outside:
            raise ManifestError(f"{where}: file {outside!r} is outside knowledge/{entry_id}/")
        facts = _req(data, "facts", dict, where)
        parts = facts.get("parts", 1)
        if not isinstance(parts, int) or isinstance(parts, bool) or not 1 <= parts <= len(files):
            raise ManifestError(f"{where}: facts.parts must be a count of its files")
        return cls(id=entry_id, name=_req(data, "name", str, where), kind=kind,
                   licence=_req(data, "licence", str, where),
                   language=_check_language(_req(data, "language", str, where), where), files=files, facts=facts)


@dataclass(frozen=True)
class RuntimeEntry:
    platform: str  # linux-x86_64, macos-arm64, windows-x86_64, linux-arm64
    entry: str  # the executable, relative to KIT/

    @property
    def folder(self) -> str:
        return posixpath.dirname(self.entry)

    @classmethod
    def parse(cls, data: Any, where: str) -> RuntimeEntry:
        if not isinstance(data, dict):
            raise ManifestError(f"{where}: must be an object")
        _no_unknown(data, {"platform", "entry"}, where)
        platform = _req(data, "platform", str, where)
        if not _PLATFORM.match(platform):
            raise ManifestError(f"{where}: unknown platform {platform!r}")
        entry = check_relpath(_req(data, "entry", str, where), f"{where} entry")
        if not entry.startswith(f"runtimes/{platform}/"):
            raise ManifestError(f"{where}: entry {entry!r} is outside runtimes/{platform}/")
        return cls(platform, entry)


@dataclass(frozen=True)
class BundleManifest:
    kit_version: str
    created: str  # ISO 8601 UTC; a stick never goes back to an older one (rollback check)
    profile: str
    models: tuple[ModelEntry, ...]
    runtimes: tuple[RuntimeEntry, ...]
    files: tuple[FileEntry, ...]
    presets: tuple[Preset, ...] = ()
    root_files: tuple[FileEntry, ...] = ()  # beside KIT/, names from ROOT_FILE_NAMES
    knowledge: tuple[KnowledgeEntry, ...] = ()
    schema_version: int = SCHEMA_VERSION
    _by_path: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        self._by_path.update({f.path: f for f in self.files})

    def file(self, path: str) -> FileEntry:
        return self._by_path[path]

    def model(self, model_id: str) -> ModelEntry:
        for m in self.models:
            if m.id == model_id:
                return m
        raise ManifestError(f"this stick has no model {model_id!r}",
                            f"models on it: {', '.join(m.id for m in self.models)}")

    def model_size(self, model: ModelEntry) -> int:
        return sum(self.file(p).size for p in model.files)

    def knowledge_source(self, knowledge_id: str) -> KnowledgeEntry:
        for k in self.knowledge:
            if k.id == knowledge_id:
                return k
        raise ManifestError(f"this stick has no knowledge {knowledge_id!r}",
                            f"knowledge on it: {', '.join(k.id for k in self.knowledge) or 'none'}")

    def knowledge_size(self, entry: KnowledgeEntry) -> int:
        return sum(self.file(p).size for p in entry.files)

    def runtime_files(self, platform: str) -> tuple[FileEntry, ...]:
        prefix = f"runtimes/{platform}/"
        return tuple(f for f in self.files if f.path.startswith(prefix))

    def to_dict(self) -> dict:
        data = {
            "schema_version": self.schema_version,
            "kit_version": self.kit_version,
            "created": self.created,
            "profile": self.profile,
            "models": [asdict(m) | {"files": list(m.files)} for m in self.models],
            "runtimes": [asdict(r) for r in self.runtimes],
            "presets": [asdict(p) for p in self.presets],
            "files": [asdict(f) for f in sorted(self.files, key=lambda f: f.path)],
        }
        if self.root_files:  # absent when empty: a bundle.json from before root_files keeps its bytes
            data["root_files"] = [asdict(f) for f in sorted(self.root_files, key=lambda f: f.path)]
        if self.knowledge:  # likewise: a stick without knowledge keeps the bytes it had
            data["knowledge"] = [asdict(k) | {"files": list(k.files)} for k in self.knowledge]
        return data

    def to_json(self) -> bytes:
        """Canonical bytes: what is hashed and signed."""
        return (json.dumps(self.to_dict(), indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()


# Upgrade steps from an older schema_version to the next: {old_version: function(dict) -> dict}.
# Version 1 is the first; a later version adds its step here so old sticks keep working.
# (root_files came within version 1: optional, so a bundle.json from before it reads unchanged.)
UPGRADES: dict[int, Any] = {}


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    keys = [k for k, _ in pairs]
    _refuse_duplicates(keys, "bundle.json key")
    return dict(pairs)


def parse_bundle_manifest(raw: bytes) -> BundleManifest:
    where = "bundle.json"
    try:
        data = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{where} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ManifestError(f"{where} must be a JSON object")
    version = _req(data, "schema_version", int, where)
    if version > SCHEMA_VERSION:
        raise ManifestError(f"{where} has schema_version {version}, newer than this kit reads ({SCHEMA_VERSION})",
                            "use the runtime on the stick itself, or a newer kit")
    while version < SCHEMA_VERSION:
        if version not in UPGRADES:
            raise ManifestError(f"{where} has unknown schema_version {version}")
        data = UPGRADES[version](data)
        version = data["schema_version"]
    allowed = {"schema_version", "kit_version", "created", "profile", "models", "runtimes", "presets", "files",
               "root_files", "knowledge"}
    _no_unknown(data, allowed, where)
    entries = _req(data, "files", list, where)
    if len(entries) > MAX_ENTRIES:
        raise ManifestError(f"{where} lists {len(entries)} files; more than {MAX_ENTRIES} is absurd")
    files = tuple(FileEntry.parse(f, f"{where} file {i + 1}") for i, f in enumerate(entries))
    _refuse_duplicates([f.path for f in files], f"{where}: file")
    _refuse_duplicates([f.path.casefold() for f in files], f"{where}: file (ignoring case, as FAT/exFAT do)")
    roots_raw = _opt(data, "root_files", list, where, [])
    root_files = tuple(FileEntry.parse(f, f"{where} root file {i + 1}", root=True) for i, f in enumerate(roots_raw))
    _refuse_duplicates([f.path for f in root_files], f"{where}: root file")
    models_raw = _req(data, "models", list, where)
    models = tuple(ModelEntry.parse(m, f"{where} model {i + 1}") for i, m in enumerate(models_raw))
    _refuse_duplicates([m.id for m in models], f"{where}: model id")
    runtimes_raw = _req(data, "runtimes", list, where)
    runtimes = tuple(RuntimeEntry.parse(r, f"{where} runtime {i + 1}") for i, r in enumerate(runtimes_raw))
    _refuse_duplicates([r.platform for r in runtimes], f"{where}: runtime platform")
    knowledge_raw = _opt(data, "knowledge", list, where, [])
    knowledge = tuple(KnowledgeEntry.parse(k, f"{where} knowledge {i + 1}") for i, k in enumerate(knowledge_raw))
    _refuse_duplicates([k.id for k in knowledge], f"{where}: knowledge id")
    manifest = BundleManifest(
        kit_version=_req(data, "kit_version", str, where), created=_req(data, "created", str, where),
        profile=_req(data, "profile", str, where), models=models, runtimes=runtimes, files=files,
        presets=_parse_presets(data.get("presets", []), where), root_files=root_files, knowledge=knowledge)
    for m in models:
        for p in m.files:
            if p not in manifest._by_path:
                raise ManifestError(f"{where}: model {m.id} names {p}, which the file list does not")
    for k in knowledge:
        for p in k.files:
            if p not in manifest._by_path:
                raise ManifestError(f"{where}: knowledge {k.id} names {p}, which the file list does not")
    for r in runtimes:
        if r.entry not in manifest._by_path:
            raise ManifestError(f"{where}: runtime {r.platform} entry {r.entry} is not in the file list")
    return manifest


MAX_MANIFEST = 64 << 20  # bytes: a real bundle.json is far smaller


def read_manifest_bytes(bundle: BundlePaths) -> bytes:
    """bundle.json's bytes, read once (what is verified is what is parsed); an unfinished build
    says so instead of looking broken or fine."""
    if bundle.incomplete_marker.exists() or not bundle.manifest.exists():
        raise IncompleteBundleError(f"the stick at {bundle.root} is incomplete: its build did not finish")
    st = bundle.manifest.lstat()
    if not stat.S_ISREG(st.st_mode):
        raise UnsafePathError("bundle.json is not a regular file")
    if st.st_size > MAX_MANIFEST:
        raise ManifestError(f"bundle.json is {st.st_size} bytes; a real one is far smaller")
    return bundle.manifest.read_bytes()


def load_bundle_manifest(bundle: BundlePaths) -> BundleManifest:
    """bundle.json of a stick, read and validated."""
    return parse_bundle_manifest(read_manifest_bytes(bundle))
