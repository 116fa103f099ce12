"""Byte ranges of a plain CSV file, cut at line starts, so several processes can parse one
file at once (the sharded prepare's pass 1, rmtl/data/shards.py).

    header_end, ranges = line_ranges(path, 8)    # [(start, end), ...] over the data rows, or None
    rows = pyarrow.csv.open_csv(ByteRange(path, header_end, *ranges[k]))   # the header line, then the range

A cut at a newline is a row boundary unless the newline sits inside a quoted field, which
no cut can tell without parsing from the file's start. So a range reports whether it saw
a quote character (``ByteRange.quoted``): the caller then reads that file in one piece
(KuaiRand's logs are numbers only and hold no quote).
"""

from __future__ import annotations

from pathlib import Path

SCAN_BYTES = 1 << 16  # read this much at a time while looking for the next newline


def _next_line_start(fh, offset: int, size: int) -> int:
    """The first position >= ``offset`` that starts a line (follows a newline), or ``size``."""
    if offset <= 0:
        return 0
    fh.seek(offset - 1)
    at = offset - 1
    while at < size:
        chunk = fh.read(SCAN_BYTES)
        if not chunk:
            break
        hit = chunk.find(b"\n")
        if hit >= 0:
            return at + hit + 1
        at += len(chunk)
    return size


def line_ranges(path: str | Path, parts: int) -> tuple[int, list[tuple[int, int]] | None]:
    """(end of the header line, about ``parts`` equal [start, end) byte ranges covering the
    rows after it, each starting at a line start; the last runs to the end of the file, a
    last line without a newline included). The ranges are None when the file cannot be
    cut: no data row after the header, or a quote in the header line."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(SCAN_BYTES)
        while b"\n" not in head and len(head) < size:  # a very long header line
            more = fh.read(SCAN_BYTES)
            if not more:
                break
            head += more
        if b"\n" not in head:
            return 0, None
        header_end = head.index(b"\n") + 1
        if b'"' in head[:header_end] or header_end >= size:
            return header_end, None
        span = size - header_end
        cuts = [header_end]
        for k in range(1, max(int(parts), 1)):
            cuts.append(max(_next_line_start(fh, header_end + span * k // parts, size), cuts[-1]))
        cuts.append(size)
    ranges = [(a, b) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]
    return header_end, ranges or None


class ByteRange:
    """A read-only file object (what pyarrow's CSV reader accepts as a source) reading the
    file's first ``header_end`` bytes (its header line, parsed by the reader as in a whole
    file), then bytes [start, end); ``quoted`` turns True once it returned a ``"`` byte."""

    def __init__(self, path: str | Path, header_end: int, start: int, end: int):
        self._fh = open(path, "rb")
        self._head = self._fh.read(header_end)
        self._fh.seek(start)
        self._left = end - start
        self.quoted = b'"' in self._head
        self.closed = False

    def read(self, size: int = -1) -> bytes:
        head, self._head = self._head, b""
        want = self._left if size is None or size < 0 else min(max(size - len(head), 0), self._left)
        data = self._fh.read(want)
        self._left -= len(data)
        self.quoted = self.quoted or b'"' in data
        return head + data if head else data

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        if not self.closed:
            self._fh.close()
            self.closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
