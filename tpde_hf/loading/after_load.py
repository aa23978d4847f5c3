"""What a loaded tpde model's layers get once transformers has filled their parts.

:meth:`tpde_hf.quantizer.TpdeHfQuantizer._process_model_after_weight_loading` runs these on the holders
(the :class:`~tpde_hf.nn.TpdeLinear` layers and weight stores the load put in place): copy CPU parts out
of the file's memory map (:func:`own_cpu_parts`), decode and check every checksum (``verify=True``:
:func:`verify_holders`), build the GPU kernels' packed form (:func:`pack_for_gpu`), and make
``save_pretrained`` write a tpde repo (:func:`wrap_save_pretrained`).

Example::

    for holder in holders.values():
        own_cpu_parts(holder)
    verify_holders(holders)
    wrap_save_pretrained(model)
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch
from torch import nn

from tpde_hf.codec import SUFFIXES, decode_tensors

DECODE_CHUNK_ELEMENTS = 1 << 24  # weights decoded per verify batch: bounds the memory of the check


def own_cpu_parts(holder: nn.Module) -> None:
    """Copy CPU parts out of the checkpoint's memory map into ordinary memory.

    transformers leaves CPU tensors as views of the mmapped safetensors file. The per-forward
    reconstruction reads every part at every step, and reading file-backed pages measured 10-30x
    slower than private memory here (the pages can be reclaimed and faulted in again).
    """
    for name in SUFFIXES:
        p = holder._parameters.get(name)
        if p is not None and p.device.type == "cpu":
            holder._parameters[name] = nn.Parameter(p.data.clone(memory_format=torch.contiguous_format),
                                                    requires_grad=False)


def verify_holders(holders: dict[str, nn.Module]) -> None:
    """Decode every weight held in memory and check it against its stored checksum (raises on a mismatch)."""
    from tpde_hf.nn.linear import encoded_of

    batch, size = [], 0
    for holder in holders.values():
        if holder._parameters["meta"].device.type == "meta":
            continue
        enc = encoded_of(holder)
        batch.append(enc)
        size += enc.numel
        if size >= DECODE_CHUNK_ELEMENTS:
            decode_tensors(batch, verify=True)
            batch, size = [], 0
    decode_tensors(batch, verify=True)


def pack_for_gpu(holders: dict[str, nn.Module]) -> None:
    """On CUDA with the kernels: build each layer's packed form now and keep the file-form delta on the host.

    The kernels decode from their own delta layout, so keeping the stored ``delta, lanes, tables``
    on the GPU as well would hold the delta twice; they move to host memory (``save_pretrained``
    still finds them there).
    """
    from tpde_hf.nn.linear import DELTA_SUFFIXES, _kernels, _packed

    for holder in holders.values():
        device = holder._parameters["qweight"].device
        tk = _kernels(device)
        if tk is None:
            continue
        _packed(holder, tk, device)
        for s in DELTA_SUFFIXES:
            p = holder._parameters[s]
            holder._parameters[s] = nn.Parameter(p.data.to("cpu"), requires_grad=False)


def wrap_save_pretrained(model: nn.Module) -> None:
    """Make ``model.save_pretrained`` also write ``tpde_manifest.json`` (checksums of the original tensors) and
    the per-tensor checksums of :mod:`tpde_hf.integrity` into the saved shards."""
    if "save_pretrained" in model.__dict__:
        return
    original = model.save_pretrained

    @functools.wraps(original)
    def save_pretrained(save_directory: str | os.PathLike, *args: Any, **kwargs: Any):
        from tpde_hf.loading.ops import write_manifest

        if kwargs.get("push_to_hub"):
            from transformers.utils import logging

            logging.get_logger("tpde_hf.quantizer").warning(  # the logger it always came from
                "tpde: push_to_hub uploads before tpde_manifest.json is written; save locally, then upload the folder"
            )
        result = original(save_directory, *args, **kwargs)
        if getattr(model, "hf_quantizer", None) is not None:
            write_manifest(os.fspath(save_directory))
            from tpde_hf.integrity import add_repo_checksums

            add_repo_checksums(save_directory)  # the shards transformers wrote carry no tpde checksums
        return result

    model.__dict__["save_pretrained"] = save_pretrained
