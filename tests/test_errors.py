"""The one table from exceptions to (sentence, fix, exit code), shared by the CLI, the TUI and the probe."""

from __future__ import annotations

import errno

from kit.errors import IntegrityError, KitError, PlanError, describe_error


def test_kit_errors_keep_their_own_sentence_fix_and_code():
    assert describe_error(PlanError("no model fits", "free memory")) == ("no model fits", "free memory", 1)
    what, fix, code = describe_error(IntegrityError("models/m.gguf is corrupt"))
    assert (what, code) == ("models/m.gguf is corrupt", 4) and "kit verify" in fix


def test_os_errors_are_named_with_the_file():
    what, fix, code = describe_error(OSError(errno.ENOSPC, "No space left on device", "/media/stick/KIT/x"))
    assert what == "the disk is full (/media/stick/KIT/x)" and "free space" in fix and code == 1


def test_anything_else_is_unexpected_and_asks_for_a_report():
    what, fix, code = describe_error(ValueError("boom"))
    assert what == "unexpected error: ValueError: boom" and "KIT_DEBUG=1" in fix and code == 70
    assert describe_error(KitError("plain"))[1] == KitError.hint  # a KitError without its own hint
