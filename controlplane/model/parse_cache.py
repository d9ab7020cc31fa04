"""The last parse of each policy file, kept while its text is unchanged.

A commit usually changes one file of many: the others are not composed again, and the loader receives the very
same nodes for them, which is how its build memo recognises documents it built before. Owned by a
`PolicyLoader` (one per long-lived service), never by the module: a one-shot load starts empty.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

from controlplane.model.yaml_source import ParsedYaml, parse_yaml

PARSE_CACHE_BYTES = 64 * 1024 * 1024
"""Text bytes the parse cache may hold: a full tree at the default size bound, twice over."""
PARSE_CACHE_FILES = 20_000


@dataclass(frozen=True)
class ParseCacheInfo:
    hits: int
    misses: int
    files: int
    bytes: int


class ParseCache:
    """The last parse of each file name, while its text is unchanged; bounded in files and in text bytes.

    A reload needs only the previous version of each file (a commit usually changes one of many), so that is
    all that is kept: an lru over (file, text) pairs kept every version it had seen, 50 MB files included.
    Least recently used names go first when a bound is reached. Loads run in worker threads and `info` may be
    read from another, hence the lock.
    """

    def __init__(self, max_bytes: int = PARSE_CACHE_BYTES, max_files: int = PARSE_CACHE_FILES) -> None:
        self._entries: OrderedDict[str, tuple[str, ParsedYaml]] = OrderedDict()
        self._bytes = 0
        self._max_bytes = max_bytes
        self._max_files = max_files
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def parse(self, file: str, text: str) -> ParsedYaml:
        """`parse_yaml`, or its result of last time when the text of `file` is unchanged."""
        cached = self._get(file, text)
        if cached is not None:
            return cached
        parsed = parse_yaml(file, text)
        self._put(file, text, parsed)
        return parsed

    def _get(self, file: str, text: str) -> ParsedYaml | None:
        with self._lock:
            entry = self._entries.get(file)
            if entry is None or entry[0] != text:
                self.misses += 1
                return None
            self._entries.move_to_end(file)
            self.hits += 1
            return entry[1]

    def _put(self, file: str, text: str, parsed: ParsedYaml) -> None:
        with self._lock:
            self._drop(file)
            if len(text) > self._max_bytes:
                return
            self._entries[file] = (text, parsed)
            self._bytes += len(text)
            while self._bytes > self._max_bytes or len(self._entries) > self._max_files:
                self._drop(next(iter(self._entries)))

    def _drop(self, file: str) -> None:
        entry = self._entries.pop(file, None)
        if entry is not None:
            self._bytes -= len(entry[0])

    def info(self) -> ParseCacheInfo:
        """Hits, misses and what the cache holds (`bytes` counts text characters)."""
        with self._lock:
            return ParseCacheInfo(self.hits, self.misses, len(self._entries), self._bytes)
