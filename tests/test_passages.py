"""kit.passages: documents cut into passages that carry what a citation needs."""

from kit.passages import MAX_PASSAGE, Passage, cut_html, cut_markdown, cut_pages, cut_text, split_long

MARKDOWN = """# Water

*A note that opens the file and is long enough to be kept as its own passage: it tells where the
advice comes from, who checked it, and when; what the reader should do first; and that local rules
and trained help come before anything written here.*

## Boiling

Bring water to a **rolling boil** for one minute ([CDC](https://example.org)).

```
## not a heading inside a fence
```

## Chemical disinfection

Follow the label.
"""


def test_markdown_is_cut_at_headings_with_the_title_kept():
    passages = cut_markdown(MARKDOWN, "sub/water.md", "pack")
    assert [p.section for p in passages] == ["", "Boiling", "Chemical disinfection"]
    assert {p.title for p in passages} == {"Water"}
    assert {p.path for p in passages} == {"sub/water.md"}
    boiling = passages[1]
    assert "rolling boil" in boiling.text and "**" not in boiling.text and "https://" not in boiling.text
    assert "## not a heading inside a fence" in boiling.text
    assert boiling.citation() == "Water — Boiling (pack: sub/water.md)"


def test_a_short_note_before_the_first_heading_is_not_a_passage():
    passages = cut_markdown("# Water\n\n*Demonstration only.*\n\n## Boiling\n\nBoil it for one minute, longer up high.",
                            "water.md", "pack")
    assert [p.section for p in passages] == ["Boiling"]
    alone = cut_markdown("Demonstration only, and nothing else in this file at all.", "note.md", "pack")
    assert [p.text for p in alone] == ["Demonstration only, and nothing else in this file at all."]


def test_long_sections_are_cut_at_paragraphs_and_named_in_parts():
    body = "\n\n".join(f"Paragraph {i}. " + "word " * 60 for i in range(12))
    passages = cut_markdown(f"# T\n\n## Long\n\n{body}\n", "t.md", "pack")
    assert len(passages) > 1
    assert all(len(p.text) <= MAX_PASSAGE for p in passages)
    assert passages[0].section == "Long" and passages[1].section == "Long (2)"
    assert "".join(p.text for p in passages).count("Paragraph") == 12


def test_a_paragraph_longer_than_a_passage_is_cut_at_sentences():
    text = " ".join(f"Sentence number {i} is here." for i in range(200))
    parts = split_long(text)
    assert all(len(p) <= MAX_PASSAGE for p in parts)
    assert all(p.endswith(".") for p in parts[:-1])


def test_plain_text_html_and_pages():
    assert cut_text("Just some plain text that is long enough to keep as a passage.", "notes/first-aid.txt",
                    "pack")[0].title == "first aid"
    html = cut_html("<title>Radio</title><h2>Calls</h2><p>MAYDAY is for danger to life.</p><script>x()</script>",
                    "radio.html", "pack")
    assert [(p.title, p.section, p.text) for p in html] == [("Radio", "Calls", "MAYDAY is for danger to life.")]
    pages = cut_pages(["First page text, long enough to be kept here.", "", "Third page text, also long enough."],
                      "manual.pdf", "pack")
    assert [p.section for p in pages] == ["page 1", "page 3"]


def test_control_characters_leave_passages_and_citations():
    (passage,) = cut_markdown("# Wa\x1b[2Jter\n\n## Boil\x07ing\n\nBring it to a boil\x1b]52;c;eA==\x07 for a minute.",
                              "water.md", "pack")
    assert (passage.title, passage.section) == ("Wa[2Jter", "Boiling")
    assert "\x1b" not in passage.text and "\x07" not in passage.text
    hostile = Passage("pack", "x\x1b]0;t\x07.md", "T", "S", "text")  # an index made elsewhere
    assert "\x1b" not in hostile.citation() and "\x07" not in hostile.citation()
