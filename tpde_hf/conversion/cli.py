"""The ``tpde`` command line: ``convert``, ``verify``, ``push``.

Examples::

    tpde convert HuggingFaceTB/SmolLM2-135M ./smollm2-tpde --push-to-hub me/smollm2-tpde --private
    tpde convert ./model.Q4_1.gguf ./out --dtype bfloat16
    tpde verify me/smollm2-tpde
    tpde push ./smollm2-tpde me/smollm2-tpde --create-pr

Exit status: 0 success, 1 conversion / verification / Hub error (message on stderr), 2 usage error,
130 interrupted (``--resume`` continues a conversion).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

EPILOG = """\
Environment: HF_TOKEN (token), HF_ENDPOINT (Hub address), HF_HOME / HF_HUB_CACHE (download cache),
HF_HUB_DISABLE_PROGRESS_BARS=1 (no progress bars), HF_HUB_OFFLINE=1 (cache only),
TPDE_LAYOUT_CACHE (where the nn.Linear layouts of converted architectures are kept; "off" disables it).
"""


def _add_hub_args(p: argparse.ArgumentParser, revision_help: str) -> None:
    p.add_argument("--revision", default=None, help=revision_help)
    p.add_argument("--token", default=None,
                   help="Hugging Face token (default: HF_TOKEN or the token saved by `hf auth login`)")


def _add_push_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--private", action="store_true", help="create the Hub repo as private (if it does not exist)")
    p.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing directly")
    p.add_argument("--commit-message", default=None, help="commit message (default: 'Upload tpde conversion ...')")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tpde",
        description="Store Hugging Face models as a 4-bit base plus a lossless delta (bit-exact); verify, push.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="only errors on stderr (no progress or info)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    c = sub.add_parser(
        "convert", help="convert a model to a verified tpde repo",
        description="Convert SOURCE (a local model folder, a .gguf file, or a Hub repo id) into a tpde repo at OUT. "
                    "Every converted tensor is decoded and compared bit for bit before OUT appears; an interrupted "
                    "run leaves only a hidden .OUT.tpde-partial folder, which --resume continues.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    c.add_argument("source", metavar="SOURCE",
                   help="local folder (config.json + safetensors, sharded or not, or pytorch_model.bin), a .gguf "
                        "file, or a Hub repo id such as HuggingFaceTB/SmolLM2-135M")
    c.add_argument("output", metavar="OUT", help="folder to create (refused if it exists, unless --overwrite)")
    _add_hub_args(c, "source revision on the Hub: branch, tag or commit (default: main)")
    c.add_argument("--group-size", type=int, default=128, choices=(32, 64, 128),
                   help="weights per 4-bit group of the base (default: 128; smaller = better base, bigger base)")
    c.add_argument("--delta-code", default="rans", choices=("rans", "class-width"),
                   help="the lossless delta's code: rans (default, smallest) or class-width (about 0.5 bit per "
                        "weight larger on bf16, decoded without a dependent chain: built for GPU decode)")
    c.add_argument("--keep-dense", default="lm_head", metavar="NAMES",
                   help="comma-separated module names (or dotted suffixes) to leave uncompressed (default: lm_head; "
                        "'' converts lm_head too, unless it is tied to the embeddings)")
    c.add_argument("--include", default=None, metavar="REGEX",
                   help="convert only linear modules whose name matches this regular expression")
    c.add_argument("--exclude", default=None, metavar="REGEX",
                   help="leave dense the linear modules whose name matches this regular expression")
    c.add_argument("--dtype", default=None, choices=("bfloat16", "float16", "float32"),
                   help="GGUF sources only: dtype to dequantize to (default: float32, exact). Other sources keep "
                        "each tensor's stored dtype")
    c.add_argument("--gguf-file", default=None, metavar="NAME", help="which .gguf file of a folder or repo to convert")
    c.add_argument("--workers", type=int, default=None, metavar="N",
                   help="worker processes for encoding (default: 1, this process, encoding on one thread per "
                        "core; more processes only add start-up on a small machine)")
    c.add_argument("--max-shard-size", default="5GB", metavar="SIZE", help="output shard size limit (default: 5GB)")
    c.add_argument("--overwrite", action="store_true",
                   help="replace OUT if it exists (the old folder is removed only once the new one is complete)")
    c.add_argument("--resume", action="store_true",
                   help="continue an interrupted conversion of the same SOURCE with the same options")
    c.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip decoding every converted tensor (faster; `tpde verify` can check later)")
    c.add_argument("--base-model", default=None, metavar="REPO_ID",
                   help="Hub id written as base_model in the model card (default: SOURCE when it is a Hub repo)")
    c.add_argument("--trust-remote-code", action="store_true",
                   help="allow custom-code architectures from SOURCE (built on the meta device to list its linear "
                        "modules; this runs the repo's Python code)")
    c.add_argument("--push-to-hub", default=None, metavar="REPO_ID", help="push OUT to this Hub repo when done")
    c.add_argument("--push-revision", default=None, metavar="BRANCH",
                   help="branch to push to (created if missing), or the target of --create-pr (default: main)")
    _add_push_args(c)
    c.add_argument("--json", action="store_true", help="print the conversion report as JSON instead of a table")

    v = sub.add_parser("verify", help="re-check a tpde repo (local or on the Hub) bit for bit",
                       description="Decode every converted tensor of REPO and check every tensor against "
                                   "tpde_manifest.json. Exit status 1 if anything differs.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    v.add_argument("repo", metavar="REPO", help="local folder or Hub repo id")
    _add_hub_args(v, "revision of a Hub repo (default: main)")
    v.add_argument("--workers", type=int, default=None, metavar="N", help="worker processes (default: all cores)")
    v.add_argument("--json", action="store_true", help="print the result as JSON")

    p = sub.add_parser("push", help="push an already converted folder to the Hub",
                       description="Upload OUT (made by `tpde convert`) to REPO_ID in one commit. Only files that "
                                   "differ from the remote are sent; failed attempts are retried without duplicating "
                                   "commits.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", metavar="OUT", help="converted folder")
    p.add_argument("repo_id", metavar="REPO_ID", help="target repo, e.g. me/model-tpde (created if missing)")
    p.add_argument("--revision", default=None, metavar="BRANCH",
                   help="branch to push to (created if missing), or the target of --create-pr (default: main)")
    p.add_argument("--token", default=None, help="Hugging Face token with write access (default: HF_TOKEN / login)")
    _add_push_args(p)
    return parser


def _setup(quiet: bool) -> None:
    import os

    logging.basicConfig(level=logging.ERROR if quiet else logging.INFO, format="%(levelname)s: %(message)s")
    if quiet:
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tpde`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    _setup(args.quiet)
    from tpde_hf.conversion.errors import ConversionError

    try:
        return _run(args)
    except ConversionError as exc:
        print(f"tpde {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if args.command == "convert":
            print("tpde convert: interrupted; run the same command with --resume to continue", file=sys.stderr)
        return 130


def _run(args: argparse.Namespace) -> int:
    if args.command == "convert":
        from tpde_hf.conversion.api import convert

        keep = tuple(k.strip() for k in args.keep_dense.split(",") if k.strip())
        report = convert(
            args.source, args.output, revision=args.revision, token=args.token, group_size=args.group_size,
            delta_code=args.delta_code,
            keep_dense=keep, include=args.include, exclude=args.exclude, workers=args.workers,
            overwrite=args.overwrite, resume=args.resume, verify=args.verify, push_to_hub=args.push_to_hub,
            private=args.private, push_revision=args.push_revision, create_pr=args.create_pr,
            commit_message=args.commit_message, dtype=args.dtype, gguf_file=args.gguf_file,
            max_shard_size=args.max_shard_size, base_model=args.base_model, trust_remote_code=args.trust_remote_code,
        )
        print(report.to_json() if args.json else f"{report.output}\n\n{report.summary_table()}")
        return 0
    if args.command == "verify":
        from tpde_hf.conversion.verify import verify_repo

        result = verify_repo(args.repo, revision=args.revision, token=args.token, workers=args.workers,
                             raise_on_error=False)
        print(result.to_json() if args.json else result.summary())
        return 0 if result.ok else 1
    from tpde_hf.conversion.hub import push_to_hub

    res = push_to_hub(args.folder, args.repo_id, token=args.token, private=args.private, revision=args.revision,
                      create_pr=args.create_pr, commit_message=args.commit_message)
    if res.commit is None:
        print(f"{res.url}@{res.revision}: already up to date, nothing pushed")
    else:
        print(f"pushed {res.files_uploaded} files to {res.pr_url or res.url} (revision {res.revision}, "
              f"commit {res.commit})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
