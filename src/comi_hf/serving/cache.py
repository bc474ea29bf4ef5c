"""Encoded contexts kept for the next question about the same document.

The context's encoder pass does not depend on the question (the encoder is causal and the
query comes after the context), so a document asked about again needs only the query pass and
the compression. This cache plays for COMI the part vLLM's prefix caching plays for a prompt
that holds the whole document: keyed by the document's tokens, bounded in bytes, least recently
used entries evicted first.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

from ..errors_comi import InvalidInputError
from ..packing import COMIContextEncoding

__all__ = ["EncodedContextCache"]


class EncodedContextCache:
    """At most `max_bytes` of [`COMIContextEncoding`]s of one context each, by token ids.

    Thread-safe. An encoding larger than the whole budget is not kept. `max_bytes=0` keeps nothing.
    """

    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise InvalidInputError(f"The cache budget must be >= 0 bytes, got {max_bytes}.")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[bytes, tuple[COMIContextEncoding, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = self.evictions = 0

    @staticmethod
    def key(token_ids: list[int]) -> bytes:
        """The entry's key: a digest of the context's token ids (their number included)."""
        digest = hashlib.sha256(len(token_ids).to_bytes(8, "little"))
        digest.update(b"".join(token.to_bytes(8, "little", signed=True) for token in token_ids))
        return digest.digest()

    def get(self, key: bytes) -> COMIContextEncoding | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self.hits += 1
            self._entries.move_to_end(key)
            return entry[0]

    def put(self, key: bytes, encoding: COMIContextEncoding) -> None:
        size = encoding.nbytes()
        with self._lock:
            if key in self._entries or size > self.max_bytes:
                return
            self._entries[key] = (encoding, size)
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, (_, evicted) = self._entries.popitem(last=False)
                self._bytes -= evicted
                self.evictions += 1

    def stats(self) -> dict:
        """Entries, bytes held, the budget, hits, misses and evictions so far."""
        with self._lock:
            return {
                "entries": len(self._entries),
                "bytes": self._bytes,
                "max_bytes": self.max_bytes,
                "hits": self.hits,
                "misses": self.misses,
                "evictions": self.evictions,
            }
