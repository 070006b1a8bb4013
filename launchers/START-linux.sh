#!/bin/sh
# Survival Kit: start the offline assistant on this Linux computer.
#
#   sh START-linux.sh                  open the chat
#   sh START-linux.sh ask "question"   any arguments go to the kit itself (try --help)
#
# Finds the runtime for this computer (KIT/runtimes/<os>-<arch>/kit) beside this file, explains
# what to do when it is missing or cannot run (a FAT32 stick, a noexec mount), then runs it.
# POSIX sh: works under dash, bash, busybox sh.

say() { printf '%s\n' "$*" >&2; }

# The stick: the folder holding this file, whatever its name (spaces, accents, ...).
STICK=$(CDPATH='' cd -- "$(dirname -- "$0")" && pwd -P) || {
    say "kit: cannot find the folder of $0"
    exit 1
}

host_os() {
    case $(uname -s) in
        Linux) echo linux ;;
        Darwin) echo macos ;;
        *) uname -s | tr '[:upper:]' '[:lower:]' ;;
    esac
}

host_arch() {
    case $(uname -m) in
        x86_64 | amd64) echo x86_64 ;;
        aarch64 | arm64 | armv8*) echo arm64 ;;
        *) uname -m ;;
    esac
}

# The runtimes this stick carries, as "linux-x86_64, windows-x86_64" (or "none").
runtimes_present() {
    list=""
    for dir in "$STICK"/KIT/runtimes/*/; do
        [ -d "$dir" ] || continue
        name=$(basename -- "$dir")
        list="${list:+$list, }$name"
    done
    echo "${list:-none}"
}

# "fstype<TAB>options<TAB>mount point" of the filesystem holding $1 (Linux), or nothing.
mount_info() {
    [ -r /proc/mounts ] || return 0
    KIT_PATH=$1 awk '
        BEGIN { path = ENVIRON["KIT_PATH"]; best = -1 }
        {
            mp = $2
            gsub(/\\040/, " ", mp); gsub(/\\011/, "\t", mp); gsub(/\\012/, "\n", mp); gsub(/\\134/, "\\", mp)
            inside = (path == mp) || (mp == "/") || (index(path, mp "/") == 1)
            if (inside && length(mp) > best) { best = length(mp); info = $3 "\t" $4 "\t" mp }
        }
        END { if (best >= 0) print info }' /proc/mounts
}

is_noexec_mount() {
    case ",$(mount_info "$1" | cut -f 2)," in
        *,noexec,*) return 0 ;;
        *) return 1 ;;
    esac
}

explain_not_executable() {
    info=$(mount_info "$1")
    fstype=$(printf '%s\n' "$info" | cut -f 1)
    mount_point=$(printf '%s\n' "$info" | cut -f 3-)
    if is_noexec_mount "$1"; then
        reason="the stick is mounted 'noexec' (${fstype:-?} at ${mount_point:-?}): Linux runs no program from it"
    else
        reason="the runtime file has no execute permission (a FAT32 stick keeps none; a copy may have lost it)"
    fi
    say "kit: the runtime on this stick cannot be started: $reason."
    say "Linux does this with sticks formatted FAT32. Either:"
    say "  - copy the whole stick folder to this computer and start START-linux.sh from the copy:"
    say "      cp -r \"$STICK\" ~/survival-kit && sh ~/survival-kit/START-linux.sh"
    say "  - or reformat the stick as exFAT (it keeps execute permission) and build it again with kit build."
    exit 1
}

# Refuse, with the reason, when this Linux's C library is older than the newest one any file of the
# runtime asks for (kit-runtime.json "glibc", read from the files' symbol versions when frozen):
# the loader would fail with a cryptic "GLIBC_2.xx not found".
check_glibc() {
    manifest="$(dirname -- "$1")/kit-runtime.json"
    [ -r "$manifest" ] || return 0
    need=$(sed -n 's/.*"glibc": *"\([0-9.]*\)".*/\1/p' "$manifest" | head -n 1)
    have=$(getconf GNU_LIBC_VERSION 2>/dev/null | sed -n 's/^glibc \([0-9.]*\).*/\1/p')
    [ -n "$need" ] && [ -n "$have" ] || return 0
    older=$(awk -v have="$have" -v need="$need" 'BEGIN {
        split(have, h, "."); split(need, n, ".")
        print (h[1] + 0 < n[1] + 0 || (h[1] + 0 == n[1] + 0 && h[2] + 0 < n[2] + 0)) ? 1 : 0 }')
    if [ "$older" = 1 ]; then
        say "kit: this stick's runtime needs glibc $need or newer; this Linux has glibc $have."
        say "     This computer's Linux is too old for this stick: use another computer, or a stick"
        say "     built on an older base (build/base.py makes runtimes for glibc 2.31 and newer)."
        exit 1
    fi
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
if [ ! -x "$RUNTIME" ] || is_noexec_mount "$RUNTIME"; then
    explain_not_executable "$RUNTIME"
fi
if [ "$(host_os)" = linux ]; then
    check_glibc "$RUNTIME"
fi

# The runtime finds its stick from its own path too; this also holds when that cannot be told.
KIT_BUNDLE=$STICK
# Which launcher started the runtime: it checks this file against bundle.json and warns if changed.
KIT_LAUNCHER=$(basename -- "$0")
export KIT_BUNDLE KIT_LAUNCHER
exec "$RUNTIME" "$@"
