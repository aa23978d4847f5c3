"""Conversion of Hugging Face models to verified tpde repos, and their push to the Hub.

Three ways in:

* Python: ``convert(source, out)``, ``verify_repo(repo)``, ``push_to_hub(out, repo_id)``;
* CLI: ``tpde convert SOURCE OUT [--push-to-hub REPO_ID]``, ``tpde verify REPO``, ``tpde push OUT REPO_ID``
  (also ``python -m tpde_hf.conversion ...``);
* optimum: ``TpdeOptimumQuantizer.from_pretrained(source).quantize(save_dir)``.

Example::

    from tpde_hf.conversion import convert, verify_repo
    report = convert("./tiny-llama", "./tiny-llama-tpde")
    print(report.summary_table())
    assert verify_repo("./tiny-llama-tpde").ok
"""

from tpde_hf.conversion.api import convert
from tpde_hf.conversion.errors import ConversionError, HubAccessError, VerificationError
from tpde_hf.conversion.hub import PushResult, push_to_hub
from tpde_hf.conversion.report import ConversionReport
from tpde_hf.conversion.verify import VerificationReport, verify_repo

__all__ = [
    "ConversionError",
    "ConversionReport",
    "HubAccessError",
    "PushResult",
    "TpdeOptimumQuantizer",
    "VerificationError",
    "VerificationReport",
    "convert",
    "push_to_hub",
    "verify_repo",
]


def __getattr__(name: str):
    # optimum is imported only when its quantizer is asked for.
    if name == "TpdeOptimumQuantizer":
        from tpde_hf.conversion.optimum import TpdeOptimumQuantizer

        return TpdeOptimumQuantizer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
