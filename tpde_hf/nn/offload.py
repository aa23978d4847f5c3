"""``lossless-offload``: the base stays on the GPU, the delta lives in pinned host memory.

At load, each layer's delta is read from its shard (one tensor at a time) into a kernel
``PackedWeight`` whose base group is the layer's resident GPU base and whose delta group is pinned
host memory. :class:`DeltaPrefetcher` copies the delta group of the *next* layer to the GPU on a
side CUDA stream while the current layer computes, so the PCIe transfer (about 46% of the bf16
bytes) overlaps compute; the current stream waits on that copy's event before decoding. The order
of layers is the order of their forwards (recorded on the first pass; module order until then),
wrapping around from the last layer to the first for the next token. Each device copy is used once
and its memory returns to the caching allocator after the layer ran.

Without Triton on the CUDA machine, the exact weight is decoded on the CPU from the host copy and
uploaded (correct, slow). ``lossless-offload`` needs CUDA: on other machines the load refuses it.

Example::

    pf = DeltaPrefetcher(layers)             # TpdeLinear modules in lossless-offload mode
    pw = pf.fetch(layers[0], device)         # layer 0's delta on the GPU; layer 1's is in flight
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from tpde_hf.codec import decode_tensor
from tpde_hf.nn.holder import _kernels, encoded_of, stored_delta

#: ``copy(holder, device) -> object on device``; run inside the side stream by the prefetcher.
Copier = Callable[[nn.Module, torch.device], Any]


def _delta_to(holder: nn.Module, device: torch.device) -> Any:
    return holder.__dict__["_tpde_host_pw"].delta_to(device, non_blocking=True)


def _tensors_of(obj: Any) -> list[torch.Tensor]:
    if hasattr(obj, "delta_tensors"):
        return list(obj.delta_tensors().values())
    if isinstance(obj, dict):
        return [t for t in obj.values() if isinstance(t, torch.Tensor)]
    return []


class DeltaPrefetcher:
    """Moves each layer's host delta to the device one layer (``lookahead``) ahead.

    ``copier`` and ``streams`` exist for tests on machines without CUDA: ``streams=False`` runs the
    copies inline (no side stream, no events).
    """

    def __init__(self, holders: list[nn.Module], lookahead: int = 1, copier: Copier | None = None,
                 streams: bool = True):
        self.order: list[nn.Module] = list(holders)
        self.lookahead = lookahead
        self._copier = copier or _delta_to
        self._streams = streams
        self._side: Any = None
        self._pending: dict[int, tuple[Any, Any]] = {}
        self._seen: list[nn.Module] = []
        self._last: nn.Module | None = None
        self._recorded = False
        self.stats = {"prefetched": 0, "sync": 0}

    def _start(self, holder: nn.Module, device: torch.device) -> tuple[Any, Any]:
        if not self._streams:
            return self._copier(holder, device), None
        if self._side is None:
            self._side = torch.cuda.Stream(device=device)
        self._side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(self._side):
            obj = self._copier(holder, device)
            event = torch.cuda.Event()
            event.record(self._side)
        return obj, event

    def _position(self, holder: nn.Module) -> int:
        for i, h in enumerate(self.order):
            if h is holder:
                return i
        return -1

    def _record_order(self, holder: nn.Module) -> None:
        if self._recorded:
            return
        # a repeat of the latest fetch (a `.weight` read, then the forward) is not the start of a new pass
        if self._seen and holder is self._seen[0] and holder is not self._last:
            self.order, self._recorded = list(self._seen), True  # second pass: the order is known
        elif all(h is not holder for h in self._seen):
            self._seen.append(holder)
        self._last = holder

    def fetch(self, holder: nn.Module, device: torch.device) -> Any:
        """``holder``'s delta on ``device`` (ready to use on the current stream); prefetches the next layers."""
        self._record_order(holder)
        pending = self._pending.pop(id(holder), None)
        if pending is None:
            obj, event = self._start(holder, device)
            self.stats["sync"] += 1
        else:
            obj, event = pending
            self.stats["prefetched"] += 1
        if event is not None:
            current = torch.cuda.current_stream(device)
            current.wait_event(event)
            for t in _tensors_of(obj):
                t.record_stream(current)
        pos = self._position(holder)
        if pos >= 0 and len(self.order) > 1:
            for k in range(1, self.lookahead + 1):
                nxt = self.order[(pos + k) % len(self.order)]
                if nxt is not holder and id(nxt) not in self._pending:
                    self._pending[id(nxt)] = self._start(nxt, device)
        return obj


def fetch_packed(holder: nn.Module, tk: Any, device: torch.device) -> Any:
    """The ``PackedWeight`` of an offloaded layer with its delta on ``device`` (via the prefetcher)."""
    prefetcher: DeltaPrefetcher = holder.__dict__["_tpde_prefetcher"]
    return prefetcher.fetch(holder, device)


def offloaded_exact_weight(holder: nn.Module, device: torch.device) -> torch.Tensor:
    """The exact weight of a ``lossless-offload`` holder on ``device``."""
    tk = _kernels(device)
    if tk is not None and "_tpde_host_pw" in holder.__dict__:
        return tk.reconstruct(fetch_packed(holder, tk, device))
    return decode_tensor(encoded_of(holder)).to(device)


def setup_offload(holders: dict[str, nn.Module], weights: dict[str, Any], verify: bool = False) -> DeltaPrefetcher:
    """Read every holder's delta from its shard into pinned host memory and install the prefetcher.

    ``holders`` maps checkpoint prefixes to modules; ``weights`` maps them to
    :class:`tpde_hf.loading.plan.EncodedWeight`. One weight at a time: host memory grows by the delta only.
    Every delta is validated against its base; ``verify`` also decodes it and checks the checksum.
    """
    from safetensors import safe_open

    pin = torch.cuda.is_available()
    by_file: dict[str, list[str]] = {}
    for prefix in holders:
        by_file.setdefault(weights[prefix].file, []).append(prefix)
    for path, prefixes in by_file.items():
        with safe_open(path, framework="pt") as fh:
            for prefix in prefixes:
                holder = holders[prefix]
                stored = (getattr(weights[prefix], "storage", None), tuple(getattr(weights[prefix], "parts", ())))
                delta = stored_delta(fh, prefix, *stored)  # a storage-laid weight: rebuilt from its parts
                device = holder._parameters["qweight"].device
                tk = _kernels(device)
                holder.__dict__["_tpde_host_delta"] = delta
                enc = encoded_of(holder)  # validates the delta against the base
                if verify:
                    decode_tensor(enc, verify=True)
                if tk is None:
                    holder.__dict__["_tpde_host_delta"] = {k: (v.pin_memory() if pin else v) for k, v in delta.items()}
                    holder.__dict__.pop("_tpde_enc", None)
                    continue
                # the kernels' packed form: base = the resident GPU tensors, delta = pinned host memory
                pw = tk.PackedWeight.from_encoded(enc, "cpu").pin_memory(("delta",))
                pw = dataclasses.replace(pw, qweight=holder._parameters["qweight"],
                                         scales=holder._parameters["scales"], zeros=holder._parameters["zeros"])
                holder.__dict__["_tpde_host_pw"] = pw
                holder.__dict__["_tpde_delta_source"] = (path, prefix, *stored)
                del holder.__dict__["_tpde_host_delta"]
                holder.__dict__.pop("_tpde_enc", None)
    prefetcher = DeltaPrefetcher(list(holders.values()))
    for holder in holders.values():
        holder.__dict__["_tpde_prefetcher"] = prefetcher
    return prefetcher


def host_delta(holder: nn.Module) -> dict[str, torch.Tensor] | None:
    """The stored delta parts of an offloaded holder (read back from its shard when only the packed form is kept)."""
    host = holder.__dict__.get("_tpde_host_delta")
    if host is not None:
        return host
    source = holder.__dict__.get("_tpde_delta_source")
    if source is None:
        return None
    from safetensors import safe_open

    path, prefix, *stored = source
    with safe_open(path, framework="pt") as fh:
        return stored_delta(fh, prefix, *stored)


__all__ = ["DeltaPrefetcher", "fetch_packed", "host_delta", "offloaded_exact_weight", "setup_offload"]
