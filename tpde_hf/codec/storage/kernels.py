"""The numba loops of the ``narrow-rans`` storage codec, by job: :mod:`.bins` (bin geometry and the derived
tables), :mod:`.delta` (coding each weight inside its bin) and :mod:`.streams` (rANS blocks, the q stream).

This module only re-exports them under the names the codec's earlier single kernel module had.

Example::

    from tpde_hf.codec.storage import kernels
    kernels.lower_edge(1, np.float32(0.01), 16, 7, 0, lut, u32, f32)
"""

from __future__ import annotations

from tpde_hf.codec.storage.bins import (  # noqa: F401 - re-exported
    CNT,
    CUM,
    DEEP,
    EMPTY,
    FR,
    LOW_BITS,
    MAX_SYMBOLS,
    MAXSEG,
    MULTI,
    NH,
    NLEV,
    ONE,
    PB,
    REC,
    SH,
    SMALL,
    ST,
    UF,
    UR,
    _div,
    _magic,
    _where,
    build_bins,
    build_segments,
    lower_edge,
    mark_bins,
    new_cache,
)
from tpde_hf.codec.storage.delta import delta_decode, delta_symbols  # noqa: F401 - re-exported
