"""The one way sizes are written for people: binary units (KiB, MiB, GiB), one decimal.

Why binary: what the kit talks about most is memory (RAM, VRAM, the plan's budget), which the
kernel, `free` and every GPU tool count in powers of two; a stick's files then read in the same
units, so "model 240.3 MiB" and "2.1 GiB RAM usable" can be compared at a glance. The IEC names
say which units they are, so nobody has to guess.
"""

from __future__ import annotations

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
TiB = 1024 * GiB

_UNITS = (("TiB", TiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB))


def human_bytes(n: float) -> str:
    """253_000_000 -> "241.3 MiB"; below 1 KiB whole bytes ("999 B")."""
    for name, size in _UNITS:
        if abs(n) >= size:
            return f"{n / size:.1f} {name}"
    return f"{n:.0f} B"
