"""The chat exactly as `kit chat` runs it (kit.tui.app.run), with the answer length and temperature
a benchmark needs: `kit chat` itself keeps the chat's defaults (512 tokens, temperature 0.3).

    .venv/bin/python bench/chat_app.py --stick DIR --max-tokens 1000 --temperature 0
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kit.conversation import AnswerSettings  # noqa: E402
from kit.plan import Overrides  # noqa: E402
from kit.tui.app import run  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/chat_app.py", description=__doc__)
    parser.add_argument("--stick", required=True)
    parser.add_argument("--max-tokens", type=int, default=AnswerSettings.max_tokens)
    parser.add_argument("--temperature", type=float, default=AnswerSettings.temperature)
    parser.add_argument("--no-knowledge", action="store_true", help="as kit chat --no-knowledge")
    args = parser.parse_args(argv)
    return run(args.stick, Overrides(), AnswerSettings(args.max_tokens, args.temperature),
               use_knowledge=not args.no_knowledge)


if __name__ == "__main__":
    sys.exit(main())
