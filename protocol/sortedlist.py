"""A sorted list of unique keys with a value each, kept in chunks: the offer book's price,
keep-order and since indexes (protocol/offerbook.py)."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Iterator
from itertools import chain, islice
from typing import Any


class SortedList:
    """A list of unique, totally ordered keys with a value each, kept sorted in chunks so an
    insertion moves at most a chunk (the idea of sortedcontainers.SortedList, cut down)."""

    __slots__ = ("_keys", "_vals", "_maxes", "_len")
    CHUNK = 512

    def __init__(self) -> None:
        self._keys: list[list] = []
        self._vals: list[list] = []
        self._maxes: list = []
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def add(self, key: Any, value: Any) -> None:
        maxes = self._maxes
        self._len += 1
        if not maxes:
            self._keys.append([key])
            self._vals.append([value])
            maxes.append(key)
            return
        i = bisect_left(maxes, key)
        if i == len(maxes):
            i -= 1
            keys, vals = self._keys[i], self._vals[i]
            keys.append(key)
            vals.append(value)
            maxes[i] = key
        else:
            keys, vals = self._keys[i], self._vals[i]
            j = bisect_left(keys, key)
            keys.insert(j, key)
            vals.insert(j, value)
        if len(keys) > 2 * self.CHUNK:
            half = self.CHUNK
            self._keys[i:i + 1] = [keys[:half], keys[half:]]
            self._vals[i:i + 1] = [vals[:half], vals[half:]]
            maxes[i:i + 1] = [keys[half - 1], keys[-1]]

    def remove(self, key: Any) -> None:
        maxes = self._maxes
        i = bisect_left(maxes, key)
        if i == len(maxes):
            raise KeyError(key)
        keys = self._keys[i]
        j = bisect_left(keys, key)
        if keys[j] != key:
            raise KeyError(key)
        del keys[j]
        del self._vals[i][j]
        self._len -= 1
        if not keys:
            del self._keys[i], self._vals[i], maxes[i]
        elif j == len(keys):
            maxes[i] = keys[-1]

    def replace(self, old: Any, new: Any, value: Any) -> None:
        """remove(old) then add(new, value); in place when `new` sorts into `old`'s slot (a
        re-announced offer whose price or score did not move: the usual case)."""
        maxes = self._maxes
        i = bisect_left(maxes, old)
        keys = self._keys[i] if i < len(maxes) else None
        j = bisect_left(keys, old) if keys else 0
        if (keys is not None and keys[j] == old
                and (keys[j - 1] < new if j else i == 0 or maxes[i - 1] < new)
                and (new < keys[j + 1] if j + 1 < len(keys)
                     else i + 1 == len(maxes) or new < self._keys[i + 1][0])):
            keys[j] = new
            self._vals[i][j] = value
            if j + 1 == len(keys):
                maxes[i] = new
            return
        self.remove(old)
        self.add(new, value)

    def first(self) -> Any:
        return self._vals[0][0]

    def _pos(self, key: Any) -> tuple[int, int]:
        """Chunk and index of the first key >= `key` (None: the start)."""
        if key is None:
            return 0, 0
        i = bisect_left(self._maxes, key)
        if i == len(self._maxes):
            return i, 0
        return i, bisect_left(self._keys[i], key)

    def slices(self, lo: Any = None, hi: Any = None) -> list[list]:
        """The values with lo <= key < hi, as a list of lists in key order."""
        i, j = self._pos(lo)
        k, m = (len(self._maxes), 0) if hi is None else self._pos(hi)
        vals = self._vals
        if (i, j) >= (k, m):
            return []
        if i == k:
            return [vals[i][j:m]]
        out = [vals[i][j:] if j else vals[i]]
        out.extend(vals[i + 1:k])
        if m:
            out.append(vals[k][:m])
        return out

    def count(self, lo: Any = None, hi: Any = None) -> int:
        """How many keys lie in lo <= key < hi (no copying)."""
        i, j = self._pos(lo)
        k, m = (len(self._maxes), 0) if hi is None else self._pos(hi)
        if (i, j) >= (k, m):
            return 0
        if i == k:
            return m - j
        vals = self._vals
        return len(vals[i]) - j + sum(map(len, vals[i + 1:k])) + m

    def irange(self, lo: Any = None, hi: Any = None) -> Iterator[Any]:
        """The values with lo <= key < hi in key order, lazily (C-level iteration)."""
        i, j = self._pos(lo)
        k, m = (len(self._maxes), 0) if hi is None else self._pos(hi)
        vals = self._vals
        if (i, j) >= (k, m):
            return iter(())
        if i == k:
            return islice(vals[i], j, m)
        parts: list[Iterable[Any]] = [islice(vals[i], j, None) if j else vals[i]]
        parts.extend(vals[i + 1:k])
        if m:
            parts.append(islice(vals[k], m))
        return chain.from_iterable(parts)
