"""Process-wide allocator settings: keep freed memory reusable instead of stranded in per-thread arenas."""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger(__name__)

_M_ARENA_MAX = -8  # glibc's mallopt parameter (malloc.h)


def limit_malloc_arenas(arenas: int) -> bool:
    """Caps glibc's malloc arenas (as MALLOC_ARENA_MAX would) for arenas created from now on.

    glibc gives each thread that allocates concurrently its own arena, up to 8 per core. gRPC's,
    the tokenizer's and BLAS's threads each strand the memory they freed in theirs: measured on the
    embeddings backend, repeated 6 MB requests grew RSS ~2.5 MB per request with the default and
    stayed flat with 2 arenas (README: "Memory"). 0 keeps glibc's default. Returns whether it applied
    (False off glibc, e.g. musl, where there is nothing to cap).
    """
    if arenas <= 0:
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    applied = bool(libc.mallopt(_M_ARENA_MAX, arenas))
    if not applied:
        log.warning("mallopt(M_ARENA_MAX) refused", extra={"arenas": arenas})
    return applied
