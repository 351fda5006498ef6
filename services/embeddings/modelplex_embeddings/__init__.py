"""Modelplex embeddings backend: EmbeddingsService over a pluggable engine."""

import os

# BLAS threads for the local engine, fixed before numpy loads (OpenBLAS reads them once).
# OpenBLAS workers spin while waiting: on a shared or oversubscribed CPU two threads ran
# MiniLM 7x slower than one here. Raise MODELPLEX_EMBEDDINGS_THREADS on dedicated cores.
_THREADS = os.environ.get("MODELPLEX_EMBEDDINGS_THREADS", "1")
for _name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
    os.environ.setdefault(_name, _THREADS)
