"""kit.builder.zimparts: cuts for FAT32 that keep a ZIM archive's search indexes whole, checked
against libzim reading the parts."""

import pytest
from knowledgekit import make_zim
from libzim.reader import Archive

from kit.builder.zimparts import ZimFormatError, broken_ranges, cut_points, index_ranges


def write_parts(data: bytes, cuts: list[int], folder, name="x.zim"):
    folder.mkdir()
    bounds = [0, *cuts, len(data)]
    for i in range(len(bounds) - 1):
        (folder / f"{name}a{chr(97 + i)}").write_bytes(data[bounds[i]:bounds[i + 1]])
    return Archive(str(folder / name))


def test_both_indexes_are_found_where_libzim_reads_them(tmp_path):
    archive = make_zim(tmp_path / "a.zim")
    ranges = index_ranges(archive)
    assert len(ranges) == 2
    data = archive.read_bytes()
    for begin, end in ranges:  # each is a whole Xapian database (its first page begins at a block)
        assert 0 < begin < end <= len(data)
    assert len(index_ranges(make_zim(tmp_path / "b.zim", fulltext=False))) == 1


def test_cuts_that_keep_the_indexes_whole_keep_search_working(tmp_path):
    archive = make_zim(tmp_path / "a.zim")
    data, ranges = archive.read_bytes(), index_ranges(archive)
    part = max(e - b for b, e in ranges) + 100
    naive = list(range(part, len(data), part))
    assert broken_ranges(naive, ranges), "this test needs a naive cut through an index"
    broken = write_parts(data, naive, tmp_path / "naive")
    assert not (broken.has_fulltext_index and broken.has_title_index)
    cuts = cut_points(len(data), part, ranges)
    assert broken_ranges(cuts, ranges) == []
    assert all(b - a <= part for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True))
    kept = write_parts(data, cuts, tmp_path / "kept")
    assert kept.is_multipart and kept.has_fulltext_index and kept.has_title_index
    assert kept.article_count == Archive(str(archive)).article_count


def test_an_index_bigger_than_a_part_is_reported_not_hidden(tmp_path):
    archive = make_zim(tmp_path / "a.zim")
    ranges = index_ranges(archive)
    small = min(e - b for b, e in ranges) // 2
    cuts = cut_points(archive.stat().st_size, small, ranges)
    assert broken_ranges(cuts, ranges)
    assert all(b - a <= small for a, b in zip([0, *cuts], [*cuts, archive.stat().st_size], strict=True))


def test_not_a_zim_is_refused(tmp_path):
    junk = tmp_path / "junk.zim"
    junk.write_bytes(b"\0" * 200)
    with pytest.raises(ZimFormatError):
        index_ranges(junk)
    short = tmp_path / "short.zim"
    short.write_bytes(make_zim(tmp_path / "a.zim").read_bytes()[:60])
    with pytest.raises(ZimFormatError):
        index_ranges(short)
