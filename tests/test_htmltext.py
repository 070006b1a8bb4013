"""kit.htmltext: HTML as readable text in sections; nothing in it runs or is shown as markup."""

from kit.htmltext import MAX_TEXT, html_sections, html_text


def test_sections_follow_headings_and_keep_the_title():
    title, sections = html_sections("<html><head><title>Water</title></head><body><p>Intro text.</p>"
                                    "<h2>Boiling</h2><p>Boil it.</p><h3>At altitude</h3><p>Longer.</p></body></html>")
    assert title == "Water"
    assert [(s.heading, s.text) for s in sections] == [("", "Intro text."), ("Boiling", "Boil it."),
                                                      ("At altitude", "Longer.")]


def test_scripts_styles_and_forms_leave_no_text():
    html = ("<p>safe</p><script>alert('x')</script><style>p{color:red}</style><noscript>js off</noscript>"
            "<form><input value='v'>form text</form><iframe src='x'>frame</iframe><p>after</p>")
    text = html_text(html)
    assert "safe" in text and "after" in text
    for bad in ("alert", "color", "js off", "form text", "frame", "<", ">"):
        assert bad not in text


def test_entities_become_characters_and_markup_stays_text():
    text = html_text("<p>1 &lt; 2 &amp; [b]bold[/b] &#x41;</p>")
    assert text == "1 < 2 & [b]bold[/b] A"


def test_broken_html_still_gives_its_text():
    title, sections = html_sections("<h2>Unclosed <p>text with <b>bold <i>and more")
    assert "text with bold and more" in " ".join(s.text for s in sections) + " ".join(s.heading for s in sections)


def test_text_kept_is_bounded():
    _, sections = html_sections("<p>" + "x" * (MAX_TEXT + 5000) + "</p>")
    assert sum(len(s.text) for s in sections) <= MAX_TEXT


def test_terminal_control_sequences_never_survive():
    """An archive's page with an OSC 52 (clipboard) sequence, a title change and a bell."""
    title, sections = html_sections("<title>T\x1b]0;owned\x07</title><h2>H\x1b[31m</h2>"
                                    "<p>a\x1b]52;c;ZXZpbA==\x07b\tc\x9bd</p>")
    text = title + " ".join(s.heading + s.text for s in sections)
    assert not any(ord(c) < 32 and c not in "\t\n" or 0x7F <= ord(c) <= 0x9F for c in text), repr(text)
    assert sections[0].text == "a]52;c;ZXZpbA==b cd"  # tabs fold into spaces like other runs


def test_a_head_left_open_does_not_swallow_the_body():
    title, sections = html_sections("<html><head><title>Water</title><body><h2>Boil</h2><p>One minute.</p>")
    assert title == "Water" and [(s.heading, s.text) for s in sections] == [("Boil", "One minute.")]
