"""Finding the non-blank lines of a large text file without parsing them: a vectorised newline scan.

A JSONL source must know where each record starts before training reads any, and every process of a
pod job builds that index at start-up. Parsing every line there costs minutes on a large file (and
is repeated on every host); looking for newline bytes with numpy costs about one read of the file.

A line is blank when it holds only ASCII whitespace (what ``bytes.strip`` removes), as before; such
lines are not records. Most lines start with ``{``, so the blank test is vectorised on each line's
first byte, and only lines that start with whitespace are looked at one by one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import IO, Iterator

import numpy as np

__all__ = ["LineChunk", "scan_lines"]

CHUNK_BYTES = 8 * 2**20
_NEWLINE = 10
_WHITESPACE = np.zeros(256, bool)
_WHITESPACE[[9, 10, 11, 12, 13, 32]] = True


@dataclass
class LineChunk:
    """The non-blank lines that end within one chunk of the file.

    ``starts``/``ends``: byte offsets of each line in the file (``end`` excludes the newline);
    ``numbers``: 1-based line numbers. With ``keep_text`` the chunk's bytes are kept so that
    :meth:`texts` can return the lines.
    """

    starts: np.ndarray
    ends: np.ndarray
    numbers: np.ndarray
    data: bytes = b""
    offset: int = 0  # file offset of data[0]
    head: bytes = b""  # the bytes before this chunk of a line that began in an earlier chunk

    def __len__(self) -> int:
        return len(self.starts)

    def texts(self) -> list[bytes]:
        """The bytes of each line (without its newline); needs ``keep_text``."""
        data, starts, ends = self.data, (self.starts - self.offset).tolist(), (self.ends - self.offset).tolist()
        out = [data[s:e] for s, e in zip(starts, ends)]
        if starts and starts[0] < 0:
            out[0] = self.head + data[:ends[0]]
        return out


def scan_lines(fh: IO[bytes], *, keep_text: bool = False, chunk_bytes: int = CHUNK_BYTES) -> Iterator[LineChunk]:
    """The non-blank lines of a binary stream, one :class:`LineChunk` per chunk read.

    Without ``keep_text`` nothing is kept between chunks but a few integers, so memory stays at one
    chunk whatever the file size.
    """
    pos = 0  # file offset of the chunk being scanned
    line_start = 0  # file offset of the line that is still open at the end of the previous chunk
    line_no = 1
    open_has_text = False  # whether that open line has a non-whitespace byte so far
    head: list[bytes] = []  # its bytes so far (keep_text only)
    while True:
        data = fh.read(chunk_bytes)
        if not data:
            break
        a = np.frombuffer(data, np.uint8)
        newlines = np.flatnonzero(a == _NEWLINE)
        if len(newlines):
            begins = np.empty_like(newlines)
            begins[0], begins[1:] = 0, newlines[:-1] + 1
            # A line whose first byte is not whitespace has text; an empty line (begin == its newline)
            # reads its newline here, which counts as whitespace. The rest are checked one by one.
            nonblank = ~_WHITESPACE[a[begins]]
            for k in np.flatnonzero(~nonblank):
                nonblank[k] = bool(data[begins[k]:newlines[k]].strip())
            if open_has_text:
                nonblank[0] = True
            starts = begins + pos
            starts[0] = line_start
            numbers = np.arange(line_no, line_no + len(newlines), dtype=np.int64)
            yield LineChunk(starts[nonblank], newlines[nonblank] + pos, numbers[nonblank],
                            data if keep_text else b"", pos, b"".join(head))
            line_no += len(newlines)
            line_start = pos + int(newlines[-1]) + 1
            tail = data[int(newlines[-1]) + 1:]
            open_has_text = bool(tail.strip())
            head = [tail] if keep_text else []
        else:
            open_has_text = open_has_text or bool(data.strip())
            if keep_text:
                head.append(data)
        pos += len(data)
    if open_has_text:  # a last line without a newline
        yield LineChunk(np.asarray([line_start], np.int64), np.asarray([pos], np.int64),
                        np.asarray([line_no], np.int64), b"", pos, b"".join(head))
