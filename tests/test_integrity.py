"""Streaming digests and atomic writes (secure_ml.integrity).

Touches: real files and directories under tmp_path, hashlib as the reference, a writer that
raises midway, an existing file that must survive, symlinks that must be refused.
Does not touch: SIGKILL mid-write (tests/test_cli.py kills the real CLI mid-stream).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from secure_ml.custody.integrity import (
    atomic_write,
    atomic_write_bytes,
    list_tree,
    sha256_bytes,
    sha256_file,
    sha256_tree,
    tree_digest,
)
from secure_ml.errors import BadInput


def test_sha256_file_matches_hashlib(tmp_path: Path) -> None:
    for size in (0, 1, 65536, (1 << 20) + 3):
        data = os.urandom(size)
        (tmp_path / "f").write_bytes(data)
        assert sha256_file(tmp_path / "f") == hashlib.sha256(data).hexdigest() == sha256_bytes(data)


def make_tree(root: Path) -> dict[str, bytes]:
    files = {"a.bin": os.urandom(3000), "sub/b.json": b"{}", "sub/deeper/c.txt": b"c" * 100_000, "empty": b""}
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return files


def test_sha256_tree_hashes_every_file_in_parallel(tmp_path: Path) -> None:
    files = make_tree(tmp_path)
    expected = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
    assert list_tree(tmp_path) == sorted(files)
    assert sha256_tree(tmp_path) == expected
    assert sha256_tree(tmp_path, workers=1) == expected


def test_tree_digest_is_order_independent_and_path_bound(tmp_path: Path) -> None:
    digests = sha256_tree(tmp_path) if make_tree(tmp_path) else {}
    assert tree_digest(digests) == tree_digest(dict(reversed(list(digests.items()))))
    renamed = {("z.bin" if k == "a.bin" else k): v for k, v in digests.items()}
    assert tree_digest(renamed) != tree_digest(digests)
    swapped = dict(digests)
    swapped["a.bin"], swapped["empty"] = digests["empty"], digests["a.bin"]
    assert tree_digest(swapped) != tree_digest(digests)


def test_trees_with_symlinks_or_that_are_not_directories_are_refused(tmp_path: Path) -> None:
    make_tree(tmp_path / "t")
    (tmp_path / "secret").write_text("outside")
    (tmp_path / "t" / "link").symlink_to(tmp_path / "secret")
    with pytest.raises(BadInput, match="symbolic link in .*: link"):
        sha256_tree(tmp_path / "t")
    (tmp_path / "t" / "link").unlink()
    (tmp_path / "t" / "sub" / "dirlink").symlink_to(tmp_path)
    with pytest.raises(BadInput, match="symbolic link"):
        list_tree(tmp_path / "t")
    with pytest.raises(BadInput, match="not a directory"):
        sha256_tree(tmp_path / "secret")


def test_atomic_write_all_or_nothing(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    atomic_write_bytes(target, b"first")
    assert target.read_bytes() == b"first" and oct(target.stat().st_mode & 0o777) == "0o600"
    with pytest.raises(RuntimeError, match="midway"):
        with atomic_write(target) as handle:
            handle.write(b"partial " * 100_000)
            raise RuntimeError("midway")
    assert target.read_bytes() == b"first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]  # no temp file left
    with atomic_write(target, mode=0o640) as handle:
        handle.write(b"second")
    assert target.read_bytes() == b"second" and oct(target.stat().st_mode & 0o777) == "0o640"


def test_atomic_write_without_overwrite(tmp_path: Path) -> None:
    target = tmp_path / "new" / "dir" / "out.bin"
    with atomic_write(target, overwrite=False) as handle:
        handle.write(b"one")
    with pytest.raises(BadInput, match="output exists"):
        with atomic_write(target, overwrite=False) as handle:
            handle.write(b"two")
    # the file appears while we write: still never clobbered
    other = tmp_path / "race.bin"
    with pytest.raises(BadInput, match="output exists"):
        with atomic_write(other, overwrite=False) as handle:
            handle.write(b"mine")
            other.write_bytes(b"theirs")
    assert target.read_bytes() == b"one" and other.read_bytes() == b"theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "race.bin"]
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.bin"]


def test_large_atomic_writes_release_pages_as_they_go_and_stay_exact(tmp_path: Path) -> None:
    """Past RELEASE_EVERY bytes the writer syncs and drops what it wrote from the page cache;
    the bytes on disk are still exactly what was written, in order."""
    from secure_ml.custody import integrity

    digest = hashlib.sha256()
    target = tmp_path / "big.bin"
    with atomic_write(target) as handle:
        for i in range(2 * integrity.RELEASE_EVERY // (1 << 20) + 3):
            piece = os.urandom((1 << 20) + i)  # odd sizes: releases fall mid-piece
            digest.update(piece)
            handle.write(piece)
            handle.write(b"|")
            digest.update(b"|")
        assert handle.raw._released >= 2 * integrity.RELEASE_EVERY  # type: ignore[attr-defined]
    assert sha256_file(target) == digest.hexdigest()


def test_direct_io_writer_keeps_exact_bytes_across_stages_flushes_and_seeks(tmp_path: Path) -> None:
    """The O_DIRECT stage: odd-sized writes spanning several stages, tell() counting staged
    bytes, a mid-stream flush (tail written, direct I/O left), more writes, a seek back and an
    overwrite; the file ends byte-exact. Where the file system refuses O_DIRECT the same
    sequence runs through the buffered fallback."""
    from secure_ml.custody import integrity

    target = tmp_path / "direct.bin"
    expected = bytearray()
    with atomic_write(target) as handle:
        for i in range(2 * integrity.STAGE_SIZE // (1 << 20) + 2):
            piece = os.urandom((1 << 20) + 16 + i)
            assert handle.write(memoryview(piece)) == len(piece)
            expected += piece
            assert handle.tell() == len(expected)
        handle.flush()
        assert os.fstat(handle.fileno()).st_size == len(expected)  # flush hands everything over
        tail = os.urandom(12345)
        handle.write(tail)
        expected += tail
        handle.seek(10)
        handle.write(b"XYZ")
        expected[10:13] = b"XYZ"
    assert target.read_bytes() == bytes(expected)


# -- the O_DIRECT read stage's zero-copy chunks (_DirectReader.chunk) ----------------------------
SMALL_STAGE = 6 * 4096  # a few chunks per stage, so that small files cross it many times


@pytest.fixture(autouse=True)
def direct_reads_for_small_files(monkeypatch: pytest.MonkeyPatch) -> None:
    """The direct path for every size here (in use it starts at DIRECT_READ_MIN)."""
    from secure_ml.custody import integrity

    monkeypatch.setattr(integrity, "DIRECT_READ_MIN", 0)


def _open_direct(path: Path, start: int = 0):  # type: ignore[no-untyped-def]
    from secure_ml.custody.integrity import direct_reader

    src = open(path, "rb")
    src.seek(start)
    reader = direct_reader(src)
    if reader is None:
        src.close()
        pytest.skip("this file system refuses O_DIRECT")
    return src, reader


def _all_chunks(reader, size: int) -> list[tuple[bytes, bool]]:  # type: ignore[no-untyped-def]
    out = []
    while True:
        view, last = reader.chunk(size)
        out.append((bytes(view), last))
        del view
        if last:
            return out
        assert len(out) < 10_000, "never reached the end"


@pytest.mark.parametrize("chunk", [1000, 4096, 4097, 4095, 3 * 4096 + 16])
@pytest.mark.parametrize("multiple,extra", [(0, 0), (1, 0), (1, -1), (1, 1), (5, 0), (5, 1), (5, -1), (6, 0), (12, 0),
                                            (13, 7)])
@pytest.mark.parametrize("start", [0, 17, 4096])
def test_direct_chunks_are_exact_and_flag_only_the_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       chunk: int, multiple: int, extra: int, start: int) -> None:
    """Files of exactly N chunks, N chunks +-1 byte, empty, many stages long, ending exactly at
    the end of a full stage (6 and 12 chunks of 4096), read from an unaligned start: the chunks
    are the file's bytes in order, each full-size but the last, and only the last says so (a
    file ending on a chunk boundary ends with a full chunk, not an extra empty one)."""
    from secure_ml.custody import integrity

    monkeypatch.setattr(integrity, "READ_STAGE_SIZE", SMALL_STAGE)
    size = max(0, multiple * chunk + extra)
    data = os.urandom(start + size)
    path = tmp_path / "data.bin"
    path.write_bytes(data)
    src, reader = _open_direct(path, start)
    try:
        got = _all_chunks(reader, chunk)
        assert reader.position() == len(data)
    finally:
        integrity.finish_direct_read(src, reader)
        assert src.tell() == len(data)
        src.close()
    assert b"".join(piece for piece, _ in got) == data[start:]
    assert [last for _, last in got] == [False] * (len(got) - 1) + [True]
    assert all(len(piece) == chunk for piece, _ in got[:-1])
    expected_count = max(1, -(-size // chunk))  # an empty file is one empty, last chunk
    assert len(got) == expected_count
    assert 0 < len(got[-1][0]) <= chunk or size == 0


def test_direct_chunks_are_views_of_the_stage_and_too_big_ones_are_refused(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from secure_ml.custody import integrity

    monkeypatch.setattr(integrity, "READ_STAGE_SIZE", SMALL_STAGE)
    path = tmp_path / "data.bin"
    path.write_bytes(os.urandom(3 * SMALL_STAGE))
    src, reader = _open_direct(path)
    try:
        view, _ = reader.chunk(1000)
        assert view.obj is reader._view.obj  # no copy: the caller reads the stage itself
        del view
        assert reader.holds(SMALL_STAGE - 4096 - 1) and not reader.holds(SMALL_STAGE - 4096)
        with pytest.raises(ValueError):
            reader.chunk(SMALL_STAGE)
    finally:
        integrity.finish_direct_read(src, reader)
        src.close()


@pytest.mark.parametrize("shrink_to", [0, 5, 2 * SMALL_STAGE + 123, 3 * SMALL_STAGE])
def test_a_file_shrinking_while_read_reads_short_without_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                shrink_to: int) -> None:
    """Truncated after the first stage was read: what comes back is a prefix of the original
    (what the stage already held, then whatever is left), ended by a last chunk; no SIGBUS."""
    from secure_ml.custody import integrity

    monkeypatch.setattr(integrity, "READ_STAGE_SIZE", SMALL_STAGE)
    data = os.urandom(8 * SMALL_STAGE + 99)
    path = tmp_path / "data.bin"
    path.write_bytes(data)
    src, reader = _open_direct(path)
    try:
        first, last = reader.chunk(5000)
        got, first_last = bytes(first), last
        del first
        os.truncate(path, shrink_to)
        rest = _all_chunks(reader, 5000)
    finally:
        integrity.finish_direct_read(src, reader)
        src.close()
    assert not first_last
    whole = got + b"".join(piece for piece, _ in rest)
    assert data.startswith(whole)
    assert len(whole) >= (SMALL_STAGE - 1) // 5000 * 5000  # the chunks the first stage already held
    assert len(whole) <= max(shrink_to, SMALL_STAGE)
    assert rest[-1][1] and not any(last for _, last in rest[:-1])


def test_small_files_are_read_through_the_page_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from secure_ml.custody import integrity

    monkeypatch.setattr(integrity, "DIRECT_READ_MIN", 1 << 20)
    small, large = tmp_path / "small", tmp_path / "large"
    small.write_bytes(b"x" * ((1 << 20) - 1))
    large.write_bytes(b"x" * (1 << 20))
    with open(small, "rb") as src:
        assert integrity.direct_reader(src) is None
    with open(large, "rb") as src:
        reader = integrity.direct_reader(src)
        if reader is None:
            pytest.skip("this file system refuses O_DIRECT")
        integrity.finish_direct_read(src, reader)
        src.seek(1)
        assert integrity.direct_reader(src) is None  # what is left to read counts, not the file size
