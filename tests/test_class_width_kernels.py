"""The class-width delta kernels (a study for issue #3) against the codec's class-width reference.

Reconstruct must give the original weight bit for bit; the fused GEMV must stay within the bound that
``F.linear`` itself meets. On CPU the kernels run under ``TRITON_INTERPRET=1``; the ``cuda`` variants
run the same checks on a GPU.
"""

from __future__ import annotations

import dataclasses
import os

import torch

if not torch.cuda.is_available():  # before anything imports triton's JIT: the kernels run interpreted
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from test_triton_kernels import (  # noqa: E402
    DEVICES,
    DTYPES,
    _fast_interpreter,  # noqa: F401  (the module's autouse fixture, reused here)
    assert_bit_exact,
    assert_matmul_close,
    weight,
)

from tpde_hf.codec import base_quant, class_width  # noqa: E402
from tpde_hf.errors import TpdeFormatError  # noqa: E402
from tpde_hf.triton_kernels.class_width_kernels import ClassWidthPacked, cw_fused_linear, cw_reconstruct  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")


def packed(w: torch.Tensor, group_size: int, device: str) -> tuple[ClassWidthPacked, class_width.ClassWidthDelta,
                                                                    base_quant.BaseTensors]:
    base = base_quant.quantize(w, group_size)
    code = class_width.encode(w, base, group_size)
    return ClassWidthPacked.from_code(code, base, device), code, base


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("shape", "group_size"), [((19, 200), 128), ((5, 1100), 64), ((17, 96), 32)])
def test_reconstruct_is_bit_exact(device, dtype, shape, group_size):
    """Odd rows (not a multiple of the 16-row block), partial last groups, a second offset span, and
    NaN payloads, ±inf, ±0, subnormals and outliers."""
    w = weight(shape, dtype, seed=shape[0])
    pw, code, base = packed(w, group_size, device)
    out = cw_reconstruct(pw)
    assert_bit_exact(out, w)
    assert_bit_exact(out, class_width.decode(code, base))


@pytest.mark.parametrize("device", DEVICES)
def test_reconstruct_constant_and_zero_groups(device):
    """Groups where every element is equal (one class, zero-width fields) and an all-zero weight."""
    w = torch.cat((torch.full((16, 128), 0.25), torch.zeros(16, 128), torch.full((16, 128), -3.0))).to(torch.bfloat16)
    pw, _, _ = packed(w, 128, device)
    assert_bit_exact(cw_reconstruct(pw), w)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows", [1, 3, 17])
def test_fused_linear_within_matmul_tolerance(device, dtype, x_dtype, rows):
    """Batch 1 takes the FMA path, 3 and 17 (two batch blocks) the row sums; all over a partial last group."""
    w = weight((20, 300), dtype, seed=7, adversarial=False)
    pw, _, _ = packed(w, 64, device)
    x = torch.randn(rows, 300, generator=torch.Generator().manual_seed(rows)).to(x_dtype).to(device)
    assert_matmul_close(cw_fused_linear(x, pw), x, w)


@pytest.mark.parametrize("device", DEVICES)
def test_fused_linear_propagates_nan_and_inf(device):
    w = weight((20, 256), torch.bfloat16, seed=3)
    pw, _, _ = packed(w, 128, device)
    x = torch.randn(1, 256, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16).to(device)
    assert_matmul_close(cw_fused_linear(x, pw), x, w)


def test_fused_linear_refuses_a_wrong_shape():
    w = weight((16, 128), torch.bfloat16, seed=1, adversarial=False)
    pw, _, _ = packed(w, 128, "cpu")
    with pytest.raises(ValueError, match=r"\[M, 128\]"):
        cw_fused_linear(torch.zeros(1, 64, dtype=torch.bfloat16), pw)


def test_a_corrupt_header_is_refused_before_any_kernel_reads():
    """The kernels trust the widths to keep reads inside the payload, so loading checks them first."""
    w = weight((16, 256), torch.bfloat16, seed=2, adversarial=False)
    base = base_quant.quantize(w, 128)
    code = class_width.encode(w, base, 128)
    header = code.header.clone()
    header[-1, -1, 0] ^= 0x0F00  # the width code of class 2 in the very last group
    with pytest.raises(TpdeFormatError):
        ClassWidthPacked.from_code(dataclasses.replace(code, header=header), base, "cpu")


@pytest.mark.parametrize("device", DEVICES)
def test_reconstruct_reads_int64_offsets(device):
    """Payloads past 2**31 bits store int64 span offsets; the kernel reads either width (built directly here:
    a real one would take a 256 MB payload)."""
    w = weight((17, 2100), torch.bfloat16, seed=4)
    pw, code, base = packed(w, 128, device)
    wide = ClassWidthPacked(dataclasses.replace(pw.code, offsets=pw.code.offsets.to(torch.int64)), pw.base)
    assert_bit_exact(cw_reconstruct(wide), w)
