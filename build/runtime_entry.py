"""Entry point of the frozen runtime (build/kit.spec): the same CLI as `python -m kit`.

A separate file rather than kit/__main__.py so PyInstaller does not put kit/ itself on the
import path (which would make `cli` importable as a top-level module).
"""

from kit.cli import main

raise SystemExit(main())
