"""Markdown that streams in at a constant cost per token: one widget, its text as cached lines.

Textual's Markdown widget re-parses and rebuilds the last top-level block on every append (a list
is one block, so a long list is rebuilt whole each time), mounts a widget per block and restyles
every sibling on each mount: the work per token grew with the answer. Here kit.tui.blocks cuts the
answer into blocks; a finished block is rendered to lines once (Rich's Markdown, at this width)
and kept, and only the block still being written is rendered again. The widget is a single
line-API widget, so layout and painting cost the same at the end of a long answer as at its start;
a new fragment repaints only the lines that changed, and the height grows GROW_STEP lines at a
time, so the transcript is laid out (and scrolled) every few lines rather than every line.
"""

from __future__ import annotations

from markdown_it import MarkdownIt
from rich.markdown import ListItem
from rich.markdown import Markdown as RichMarkdown
from rich.segment import Segment
from rich.syntax import Syntax
from textual.geometry import Region, Size
from textual.strip import Strip
from textual.widget import Widget

from kit.tui.blocks import Block, BlockSplitter

CODE_THEME = "ansi_dark"  # the terminal's own colours: readable in a 16-colour console too


class _NumberedItem(ListItem):
    """A numbered list item drawn as the answer wrote it, "1." (Rich draws a bare "1")."""

    def render_number(self, console, options, number, last_number):
        width = len(str(last_number - 1)) + 3  # Rich passes one past the last number
        lines = console.render_lines(self.elements, options.update(width=options.max_width - width), style=self.style)
        style = console.get_style("markdown.item.number", default="none")
        for i, line in enumerate(lines):
            yield Segment(f"{number}.".rjust(width - 1) + " " if i == 0 else " " * width, style)
            yield from line
            yield Segment("\n")


_PARSER = MarkdownIt().enable("strikethrough").enable("table")  # what rich.markdown.Markdown parses with


class _AnswerMarkdown(RichMarkdown):
    elements = {**RichMarkdown.elements, "list_item_open": _NumberedItem}

    def __init__(self, markup: str) -> None:
        # Rich's Markdown builds a new markdown-it parser for each text (compiling its linkify
        # patterns again): a third of the cost of a frame here. One parser serves every block.
        self.markup, self.parsed = markup, _PARSER.parse(markup)
        self.code_theme = self.inline_code_theme = CODE_THEME
        self.justify, self.style, self.hyperlinks, self.inline_code_lexer = None, "none", True, None


class MarkdownLines(Widget):
    """Markdown text that can grow: `append` fragments, `finish` when it is complete."""

    DEFAULT_CSS = "MarkdownLines { height: auto; }"
    GROW_STEP = 4  # while streaming the height grows 4 lines at a time: a layout (and a repaint
    #                of everything the scroll moved) every 4 lines of the answer, not every line

    def __init__(self, text: str = "", **kwargs) -> None:
        super().__init__(**kwargs)
        self.text = ""
        self._splitter = BlockSplitter()
        self._finished: list[Block] = []
        self._pending: list[Block] = []
        self._streaming = False
        self._width = 0
        self._frozen: list[Strip] = []  # lines of the first _frozen_blocks finished blocks, at _width
        self._frozen_blocks = 0
        self._live: list[Strip] | None = None  # lines of the pending blocks; None: not rendered yet
        if text:
            self._feed(text)
            self.finish()

    # ------------------------------------------------------------------ the text

    def append(self, fragment: str) -> None:
        if fragment:
            before = self._snapshot()
            self._streaming = True
            self._feed(fragment)
            self._changed(before)

    def finish(self) -> None:
        """The text is complete: the last block is finished too."""
        before = self._snapshot()
        self._streaming = False
        self._finished += self._splitter.close()
        self._pending = []
        self._live = None
        self._changed(before)

    def _feed(self, fragment: str) -> None:
        self.text += fragment
        self._finished += self._splitter.feed(fragment)
        self._pending = self._splitter.pending()
        self._live = None

    # ------------------------------------------------------------------ what to repaint

    def _snapshot(self) -> tuple[int, list[Strip], int] | None:
        """(height, the lines that may change, where they start) before a change."""
        if not self._width or not self.is_attached:
            return None
        frozen, live = self._lines(self._width)
        return self._content_height(), live, len(frozen)

    def _changed(self, before: tuple[int, list[Strip], int] | None) -> None:
        """Lay out again only when the height changed; otherwise repaint only the lines that
        differ (usually the last one or two: everything above them is as it was)."""
        if not self.is_attached:
            return
        if before is None:
            self.refresh(layout=True)
            return
        frozen, live = self._lines(self._width)
        height, old, top = before
        if self._content_height() != height:
            self.refresh(layout=True)
            return
        new = frozen[top:] + live
        first = next((i for i, (a, b) in enumerate(zip(old, new, strict=False)) if a != b), min(len(old), len(new)))
        if len(old) != len(new) or first < len(new):
            self.refresh(Region(0, top + first, self._width, height - top - first))

    # ------------------------------------------------------------------ rendering

    def _lines(self, width: int) -> tuple[list[Strip], list[Strip]]:
        """Render what is new since the last frame: newly finished blocks once, the pending ones
        again. Called at most once a frame (layout, then painting), however many fragments came."""
        if width != self._width:  # a resize: the only time finished blocks are rendered twice
            self._width, self._frozen, self._frozen_blocks, self._live = width, [], 0, None
        if self._frozen_blocks < len(self._finished):
            self._frozen += self._render_blocks(self._finished[self._frozen_blocks:], first=not self._frozen_blocks)
            self._frozen_blocks = len(self._finished)
        if self._live is None:
            self._live = self._render_blocks(self._pending, first=not self._finished)
        return self._frozen, self._live

    def _content_height(self) -> int:
        lines = len(self._frozen) + len(self._live or ())
        if self._streaming:
            lines = -(-lines // self.GROW_STEP) * self.GROW_STEP
        return lines

    def _render_blocks(self, blocks: list[Block], *, first: bool) -> list[Strip]:
        lines: list[Strip] = []
        for i, block in enumerate(blocks):
            if block.gap_before and not (first and i == 0):
                lines.append(Strip.blank(self._width))
            lines += self._render_block(block)
        return lines

    def _render_block(self, block: Block) -> list[Strip]:
        console = self.app.console
        options = console.options.update(width=self._width, highlight=False, height=None)
        if block.is_code:
            pad = (0 if block.continued else 1, 1, 0 if block.continues else 1, 1)
            renderable = Syntax(block.source, block.lexer or "text", theme=CODE_THEME, word_wrap=True, padding=pad)
            return [Strip(line) for line in console.render_lines(renderable, options, pad=True)]
        rendered = console.render_lines(_AnswerMarkdown(block.source), options, pad=True)
        return _trim_blank_edges([Strip(line) for line in rendered])

    def get_content_height(self, container: Size, viewport: Size, width: int) -> int:
        if not width:
            return 0
        self._lines(width)
        return self._content_height()

    def render_line(self, y: int) -> Strip:
        width = self.size.width
        frozen, live = self._lines(width)
        line = frozen[y] if y < len(frozen) else live[y - len(frozen)] if y - len(frozen) < len(live) else None
        if line is None:
            return Strip.blank(width, self.rich_style)
        return line.crop_extend(0, width, None).apply_style(self.rich_style)


def _trim_blank_edges(lines: list[Strip]) -> list[Strip]:
    """Rich puts blank lines around some blocks (lists); the gaps between blocks are ours."""
    def blank(strip: Strip) -> bool:
        return not strip.text.strip() and not any(seg.style and seg.style.bgcolor for seg in strip
                                                  if isinstance(seg, Segment))

    start, end = 0, len(lines)
    while start < end and blank(lines[start]):
        start += 1
    while end > start and blank(lines[end - 1]):
        end -= 1
    return lines[start:end]
