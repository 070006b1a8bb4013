"""The KitError tree, and the one table from any exception to (sentence, fix, exit code).

Every error a user can meet carries one sentence and one fix. The CLI, the TUI and the probe
child all describe errors through `describe_error` (as huggingface_hub's cli/_errors.py does);
a traceback only with KIT_DEBUG=1.
"""

from __future__ import annotations

import errno


class KitError(Exception):
    """Base of every error the kit reports to a user."""

    hint = "run with KIT_DEBUG=1 for details"
    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        if hint is not None:
            self.hint = hint


class ManifestError(KitError):
    """A profile or bundle.json is malformed, unsafe or of an unknown version."""

    hint = "rebuild the stick with `kit build`, or fix the profile file"


class UnsafePathError(ManifestError):
    """A path in a manifest would leave the bundle (absolute, `..`, a link, a device)."""

    hint = "this manifest is unsafe; rebuild the stick from a trusted machine"


class IncompleteBundleError(KitError):
    """The stick was not finished (a build was interrupted)."""

    hint = "run the same `kit build` again to finish it"
    exit_code = 3


class BundleNotFoundError(KitError):
    hint = "run it from inside the stick's folder, pass --stick DIR (the folder holding KIT/), or set KIT_BUNDLE"


class IntegrityError(KitError):
    """Bytes on the stick do not match the manifest."""

    hint = "run `kit verify` to see every damaged file; copy the stick again from a good one"
    exit_code = 4


class SignatureError(IntegrityError):
    hint = "the stick was changed after it was signed, or signed by someone else; do not trust it"


class NotVerifiedError(IntegrityError):
    """Something tried to load a file whose hash was not checked in this process."""

    hint = "verify the file first (kit.integrity.verify_file); this is a bug in the caller"


class OfflineViolation(KitError):
    """Something tried to reach the network while the kit runs offline."""

    hint = "the kit never uses the network when it runs; report which component tried"


class KernelError(KitError):
    """No CPU kernel variant works on this host."""

    hint = "run `kit doctor` to see the probe table; this runtime may not suit this CPU"


class EngineError(KitError):
    """The model could not be loaded or run."""

    hint = "run `kit doctor` to see what the kit chose; try a smaller model or context"


class ChatTemplateError(EngineError):
    """A model's chat template that its sandbox refused: every setting of that model would fail."""


class PlanError(KitError):
    """No model on the stick fits this host, or an override does not fit."""

    hint = "run `kit doctor` to see what fits; free memory or choose a smaller model"


class ServeError(KitError):
    """llama-server could not start, or stopped while serving."""

    hint = "run `kit doctor --serve` to see the plan; KIT_DEBUG=1 shows the server's last lines"


class PoolError(KitError):
    """A pool worker could not start, or a lead could not use a worker."""

    hint = "run `kit doctor --pool HOST:PORT,...` to see each worker's answer and the pooled plan"


class PoolLost(PoolError):
    """A worker stopped answering while the pool served."""

    hint = "start the worker again (kit pool worker), or go on without the pool"


class KnowledgeError(KitError):
    """A knowledge source on the stick cannot be used (damaged, unreadable, or not what it claims)."""

    hint = "run `kit verify` to see what is damaged; answers still work without it (--no-knowledge)"


class SourceError(KitError):
    """A model source in a profile could not be fetched or did not match its pin."""

    hint = "check the profile's source entry and your network; `kit lock` re-pins it"


class BuildError(KitError):
    hint = "fix the cause and run the same `kit build` again; finished files are kept"


# OS errors a user can meet, as one sentence and a fix each (others fall to the last row).
OS_ERRORS = {
    errno.ENOSPC: ("the disk is full", "free space on the target or use a bigger stick, then rerun"),
    errno.EIO: ("the stick could not be read (was it pulled out?)",
                "plug the stick back in and start again; run `kit verify` if it keeps failing"),
    errno.ENODEV: ("the stick is gone (was it pulled out?)", "plug the stick back in and start again"),
    errno.ENXIO: ("the stick is gone (was it pulled out?)", "plug the stick back in and start again"),
    errno.EROFS: ("the target is read-only", "choose a writable folder or unlock the stick"),
    errno.EACCES: ("permission denied", "choose a folder you may write to"),
    errno.ENOENT: ("a file or folder does not exist", "check the path you gave"),
}
UNEXPECTED_EXIT_CODE = 70


def describe_error(err: BaseException) -> tuple[str, str, int]:
    """The one table from exceptions to (sentence, fix, exit code)."""
    if isinstance(err, KitError):
        return str(err), err.hint, err.exit_code
    if isinstance(err, OSError) and err.errno in OS_ERRORS:
        what, fix = OS_ERRORS[err.errno]
        return what + (f" ({err.filename})" if err.filename else ""), fix, 1
    return (f"unexpected error: {type(err).__name__}: {err}",
            "run again with KIT_DEBUG=1 and report the output", UNEXPECTED_EXIT_CODE)
