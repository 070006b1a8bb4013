#!/bin/sh
# Survival Kit: start the offline assistant on this Mac. Double-click it in Finder (it opens in
# Terminal), or run:
#
#   sh START-macos.command                  open the chat
#   sh START-macos.command ask "question"   any arguments go to the kit itself (try --help)
#
# Finds the runtime for this Mac (KIT/runtimes/macos-<arch>/kit) beside this file, explains what
# to do when it is missing or blocked (Gatekeeper quarantine, no execute permission), then runs it.
# POSIX sh (macOS runs it with its /bin/sh).

say() { printf '%s\n' "$*" >&2; }

# The stick: the folder holding this file (Terminal starts us in the home folder, not there).
STICK=$(CDPATH='' cd -- "$(dirname -- "$0")" && pwd -P) || {
    say "kit: cannot find the folder of $0"
    exit 1
}

host_os() {
    case $(uname -s) in
        Darwin) echo macos ;;
        Linux) echo linux ;;
        *) uname -s | tr '[:upper:]' '[:lower:]' ;;
    esac
}

# Apple Silicon counts as arm64 even when this shell runs under Rosetta (uname -m says x86_64).
host_arch() {
    if [ "$(sysctl -n hw.optional.arm64 2>/dev/null)" = 1 ]; then
        echo arm64
        return
    fi
    case $(uname -m) in
        x86_64 | amd64) echo x86_64 ;;
        aarch64 | arm64) echo arm64 ;;
        *) uname -m ;;
    esac
}

runtimes_present() {
    list=""
    for dir in "$STICK"/KIT/runtimes/*/; do
        [ -d "$dir" ] || continue
        name=$(basename -- "$dir")
        list="${list:+$list, }$name"
    done
    echo "${list:-none}"
}

is_quarantined() {
    command -v xattr >/dev/null 2>&1 && xattr -p com.apple.quarantine "$1" >/dev/null 2>&1
}

# $1: what happened, in one line.
explain_quarantine() {
    say "kit: $1"
    say "macOS Gatekeeper blocks programs that came from a download or another computer and are not"
    say "notarised by Apple (the kit is not). To unblock this stick's files, paste this into Terminal:"
    say "    xattr -dr com.apple.quarantine \"$STICK\""
    say "then start again; 'sh \"$0\" verify' checks every file of the stick against its checksums."
}

explain_not_executable() {
    say "kit: the runtime on this stick has no execute permission (a FAT32 stick or a copy may lose it)."
    say "Either:"
    say "  - copy the whole stick folder to this Mac (e.g. into your home folder) and start it from there,"
    say "  - or reformat the stick as exFAT and build it again with kit build,"
    say "  - or, for this copy only:  chmod +x \"$1\""
    exit 1
}

if [ -e "$STICK/KIT/INCOMPLETE" ]; then
    say "kit: this stick is incomplete: its build did not finish. Run the same 'kit build' again."
    exit 1
fi

PLATFORM="$(host_os)-$(host_arch)"
RUNTIME="$STICK/KIT/runtimes/$PLATFORM/kit"

if [ ! -f "$RUNTIME" ]; then
    say "kit: this stick has no runtime for $PLATFORM; it has: $(runtimes_present)"
    exit 1
fi
if [ ! -x "$RUNTIME" ]; then
    explain_not_executable "$RUNTIME"
fi
if is_quarantined "$RUNTIME"; then
    explain_quarantine "macOS has put the runtime on this stick in quarantine."
    exit 1
fi

# The runtime finds its stick from its own path too; this also holds when that cannot be told.
KIT_BUNDLE=$STICK
# Which launcher started the runtime: it checks this file against bundle.json and warns if changed.
KIT_LAUNCHER=$(basename -- "$0")
export KIT_BUNDLE KIT_LAUNCHER
# Not exec: when macOS kills an unsigned or blocked program (SIGKILL, exit 137) we can still explain.
"$RUNTIME" "$@"
status=$?
if [ "$status" -eq 137 ] || [ "$status" -eq 126 ]; then
    explain_quarantine "macOS stopped the runtime (exit $status). If it stopped at once, Gatekeeper blocked it."
fi
exit "$status"
