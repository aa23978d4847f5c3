"""The environment check of a tpde load: which devices a ``device_map`` uses and the mode they resolve to.

:meth:`tpde_hf.quantizer.TpdeHfQuantizer.validate_environment` runs :func:`check_environment` before
transformers builds the model: it checks the stored format, resolves ``mode=None`` to the device's default
(``lossless`` on CUDA, ``dequantize`` elsewhere) and refuses the combinations that cannot load.

Example::

    cfg = TpdeConfig()
    check_environment(cfg, device_map=None)
    cfg.mode  # 'dequantize' (the CPU default)
"""

from __future__ import annotations

from typing import Any

import torch

from tpde_hf.config import DEFAULT_CPU_MODE, DEFAULT_GPU_MODE, TpdeConfig

KNOWN_DEVICE_TYPES = ("cpu", "cuda", "disk", "meta", "mps", "xpu")


def device_types(device_map: Any) -> set[str]:
    """Device types a ``device_map`` (None, a string, a device, an index or a dict) puts weights on.

    Example: ``device_types({"model": 0, "lm_head": "cpu"}) == {"cuda", "cpu"}``.
    """
    if device_map is None:
        return {"cpu"}
    if isinstance(device_map, str):
        if device_map in ("auto", "balanced", "balanced_low_0", "sequential"):
            return {"cuda"} if torch.cuda.is_available() else {"cpu"}
        return {torch.device(device_map).type}
    if isinstance(device_map, torch.device):
        return {device_map.type}
    if isinstance(device_map, int):
        return {"cuda"}
    types = set()
    for v in device_map.values():
        if isinstance(v, int):
            types.add("cuda")
        elif isinstance(v, torch.device):
            types.add(v.type)
        elif v == "disk":
            types.add("disk")
        else:
            types.add(torch.device(v).type)
    return types


def check_environment(cfg: TpdeConfig, device_map: Any) -> None:
    """Check ``cfg`` and ``device_map`` for a load and set ``cfg.mode`` when it is None (the device's default).

    Raises ValueError (format, options, devices) or RuntimeError (``lossless-offload`` without CUDA), each
    naming what to change. Example: ``check_environment(TpdeConfig(mode="base"), "cpu")``.
    """
    cfg.check_format("config.json (quantization_config)")
    cfg.check_requested_format()
    cfg._check_mode()
    try:
        types = device_types(device_map)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"tpde: cannot tell which devices device_map={device_map!r} uses") from None
    unknown = types - set(KNOWN_DEVICE_TYPES)
    if unknown:
        raise ValueError(
            f"tpde: device type(s) {sorted(unknown)} are not supported; tpde models run on CUDA GPUs "
            "(Triton kernels or the torch path) and on CPU, MPS and XPU (torch path)"
        )
    if cfg.mode is None:
        cfg.mode = DEFAULT_GPU_MODE if "cuda" in types else DEFAULT_CPU_MODE
    if cfg.mode == "lossless-offload" and ("cuda" not in types or not torch.cuda.is_available()):
        raise RuntimeError(
            "tpde: mode 'lossless-offload' keeps the delta in pinned host memory and streams it to a CUDA GPU, "
            f"but this load has no CUDA device (device_map={device_map!r}, "
            f"torch.cuda.is_available()={torch.cuda.is_available()}). On this machine use mode='dequantize' "
            "(the CPU default) or mode='lossless'; 'lossless-offload' runs with device_map='cuda' or 'auto' "
            "on a machine with an NVIDIA GPU."
        )
    if cfg.verify and cfg.mode == "base":
        raise ValueError(
            "tpde: verify=True checks decoded weights against the original checksums, but mode='base' never "
            "reads the delta; use verify with mode 'lossless', 'lossless-offload' or 'dequantize'"
        )
