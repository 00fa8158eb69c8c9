"""A fixed-ceiling table of example digests for the duplicate check.

Open addressing over two flat arrays (64-bit digest, 32-bit first line), so an entry costs
12 bytes and no Python object. The table doubles from :data:`START_SLOTS` up to
:data:`MAX_SLOTS` slots, kept at most half full: at its ceiling it holds
:data:`MAX_ENTRIES` (2,097,152) examples in 48 MiB. Past that, later examples are still
compared against the stored ones but no longer stored; :attr:`DigestTable.full_at_line` says
from which line, so the report can say the check was partial. Digests are 64-bit, so the
chance of a false duplicate among a million examples is about 3e-8.
"""

from __future__ import annotations

from array import array

START_SLOTS = 1 << 16
MAX_SLOTS = 1 << 22
MAX_ENTRIES = MAX_SLOTS // 2
BYTES_AT_CEILING = MAX_SLOTS * (8 + 4)
_MASK64 = (1 << 64) - 1


class DigestTable:
    """Digest → first line; ``add`` answers the earlier line of a repeat, or 0."""

    def __init__(self, max_entries: int = MAX_ENTRIES) -> None:
        self._max_entries = max_entries
        self._slots = START_SLOTS
        self._keys = array("Q", bytes(8 * START_SLOTS))
        self._lines = array("I", bytes(4 * START_SLOTS))
        self.size = 0
        self.full_at_line = 0
        """The first line that could not be stored (0 while nothing was left out)."""

    def add(self, digest: int, line: int) -> int:
        """Store ``digest`` seen at ``line``; return the line of an earlier equal digest, or 0."""
        key = (digest & _MASK64) or 1  # 0 marks an empty slot
        keys = self._keys
        mask = self._slots - 1
        i = key & mask
        while True:
            k = keys[i]
            if k == 0:
                break
            if k == key:
                return self._lines[i]
            i = (i + 1) & mask
        if self.size >= self._max_entries:
            if not self.full_at_line:
                self.full_at_line = line
            return 0
        keys[i] = key
        self._lines[i] = line
        self.size += 1
        if self.size * 2 > self._slots and self._slots < MAX_SLOTS:
            self._grow()
        return 0

    def _grow(self) -> None:
        old_keys, old_lines = self._keys, self._lines
        self._slots *= 2
        mask = self._slots - 1
        keys = array("Q", bytes(8 * self._slots))
        lines = array("I", bytes(4 * self._slots))
        for k, line in zip(old_keys, old_lines, strict=True):
            if k:
                i = k & mask
                while keys[i]:
                    i = (i + 1) & mask
                keys[i] = k
                lines[i] = line
        self._keys, self._lines = keys, lines

    @property
    def nbytes(self) -> int:
        return self._slots * 12
