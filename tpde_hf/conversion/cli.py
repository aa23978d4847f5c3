"""The ``tpde`` command line: ``convert``, ``verify``, ``push``.

Examples::

    tpde convert HuggingFaceTB/SmolLM2-135M ./smollm2-tpde --push-to-hub me/smollm2-tpde --private
    tpde convert ./model.Q4_1.gguf ./out --dtype bfloat16
    tpde convert ./fp32-model ./out --dtype bfloat16   # exact with respect to the model cast to bf16
    tpde verify me/smollm2-tpde
    tpde push ./smollm2-tpde me/smollm2-tpde --create-pr
    tpde examples minilm        # path of an example model installed by scripts/setup.sh

Exit status: 0 success, 1 conversion / verification / Hub error, or bad input (one line on stderr
naming the file and the problem), 2 usage error, 130 interrupted (the message says whether
``--resume`` can continue the conversion).
"""

from __future__ import annotations

import argparse
import errno
import logging
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

EPILOG = """\
Environment: HF_TOKEN (token), HF_ENDPOINT (Hub address), HF_HOME / HF_HUB_CACHE (download cache),
HF_HUB_DISABLE_PROGRESS_BARS=1 (no progress bars), HF_HUB_OFFLINE=1 (cache only),
TPDE_LAYOUT_CACHE (where the linear-weight layouts of converted architectures are kept; "off" disables it).
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
    c.add_argument("--base-quantizer", default="minmax", choices=("minmax", "search"),
                   help="how the 4-bit base is chosen: minmax (default, fastest conversion) or search (per-group "
                        "clipped-range search with least-squares scales: a closer base for base mode and the draft, "
                        "slower to convert); the repo is exact either way")
    c.add_argument("--storage", default=None, metavar="NAME",
                   help="lay each converted weight out on disk with this registered base storage "
                        "(tpde_hf.codec.registry.BASE_STORAGE); default: the resident layout (X.qweight ... X.meta)")
    c.add_argument("--keep-dense", default="lm_head", metavar="NAMES",
                   help="comma-separated checkpoint or module names (or dotted suffixes) to leave dense "
                        "(default: lm_head; '' converts lm_head too, unless it is tied to the embeddings)")
    c.add_argument("--include", default=None, metavar="REGEX",
                   help="convert only the linear-like weights whose checkpoint name (without .weight) or model "
                        "module name matches this regular expression")
    c.add_argument("--exclude", default=None, metavar="REGEX",
                   help="leave dense the linear-like weights whose checkpoint name (without .weight) or model "
                        "module name matches this regular expression")
    c.add_argument("--dtype", default=None, choices=("bfloat16", "float16", "float32"),
                   help="cast every floating tensor of the source to this dtype first (as from_pretrained(dtype=) "
                        "does); the repo is then exact with respect to the cast model, and its config, report and "
                        "card say so. Refused if a finite value would become inf (float32 beyond float16's range). "
                        "Default: every tensor keeps its stored dtype (GGUF: dequantized to float32, exact)")
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
    c.add_argument("--reference", default=None, metavar="BASE[@REV]",
                   help="store SOURCE (a fine-tune) as exact deltas against this base model: a Hub repo id with "
                        "optional @revision (pinned to its commit), or a local folder")
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
    v.add_argument("--write-checksums", action="store_true",
                   help="for a local REPO written by an earlier tpde-hf: after a full verification, add per-tensor "
                        "checksums to every shard header (each shard rewritten atomically), so that every load "
                        "checks the stored bytes")

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

    e = sub.add_parser("examples", help="print where the example models installed by scripts/setup.sh are",
                       description="Print the path of the example models that scripts/setup.sh installs "
                                   "(minilm: a model folder; smollm2: a GGUF file), e.g. "
                                   '`tpde convert "$(tpde examples minilm)" minilm-tpde`.')
    e.add_argument("name", nargs="?", default=None, metavar="NAME",
                   help="print only this example's path (minilm or smollm2)")
    from tpde_hf.checkpoints.cli import add_parser as add_ckpt_parser

    add_ckpt_parser(sub)
    return parser


@contextmanager
def _output(quiet: bool) -> Iterator[None]:
    """Logging to stderr; with ``quiet``, no progress bars for the length of the command.

    The bar settings are put back afterwards, so that ``main`` called in-process (tests, a
    notebook) does not silence the caller's later progress bars.
    """
    import os

    logging.basicConfig(level=logging.ERROR if quiet else logging.INFO, format="%(levelname)s: %(message)s")
    if not quiet:
        yield
        return
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled, old_env = are_progress_bars_disabled(), os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS")
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # worker processes read it
    disable_progress_bars()
    try:
        yield
    finally:
        if old_env is None:
            os.environ.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)
        else:
            os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = old_env
        if not was_disabled:
            enable_progress_bars()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tpde`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    with _output(args.quiet):
        return _main(args)


def _main(args: argparse.Namespace) -> int:
    from tpde_hf.conversion.errors import ConversionError
    from tpde_hf.conversion.partial import kept_partial
    from tpde_hf.errors import TpdeFormatError

    # Bad input and file-system trouble are the user's to fix: one line naming the file, no traceback.
    # Anything else is a bug in tpde-hf, whose traceback is worth reporting: it is not caught.
    try:
        with _kill_as_interrupt():
            return _run(args)
    except (ConversionError, TpdeFormatError, OSError) as exc:
        print(f"tpde {args.command}: error: {_one_line(exc)}{_where(args, exc)}{_resume_hint(kept_partial(exc))}",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        if args.command == "convert":
            kept = kept_partial(exc)
            hint = _resume_hint(kept) if kept else " (nothing finished yet was kept; rerun to start over)"
            print(f"tpde convert: interrupted{hint}", file=sys.stderr)
        return 130


@contextmanager
def _kill_as_interrupt() -> Iterator[None]:
    """``kill`` (SIGTERM) stops a command the way Ctrl-C does: a conversion keeps what ``--resume`` can use and says so.

    Only the main thread can set a signal handler; the previous handler is put back afterwards.
    """
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line (a wrapped library message may hold newlines)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def _where(args: argparse.Namespace, exc: BaseException) -> str:
    """Where a conversion ran out of space, which the error does not say (``write`` on a full disk names no file).
    Only for a full disk or quota: other OSErrors without a file name (a download's, say) are not about the output."""
    full = isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT) and exc.filename is None
    return f" (writing {args.output})" if full and args.command == "convert" else ""


def _resume_hint(kept: object) -> str:
    if kept is None:
        return ""
    return f"; the finished part is kept in {kept}: run the same command with --resume to continue"


def _run(args: argparse.Namespace) -> int:
    if args.command == "convert":
        from tpde_hf.conversion.api import convert

        keep = tuple(k.strip() for k in args.keep_dense.split(",") if k.strip())
        if args.reference:
            from tpde_hf.reference.cli import run_convert

            return run_convert(args, keep)
        report = convert(
            args.source, args.output, revision=args.revision, token=args.token, group_size=args.group_size,
            delta_code=args.delta_code, storage=args.storage, base_quantizer=args.base_quantizer,
            keep_dense=keep, include=args.include, exclude=args.exclude, workers=args.workers,
            overwrite=args.overwrite, resume=args.resume, verify=args.verify, push_to_hub=args.push_to_hub,
            private=args.private, push_revision=args.push_revision, create_pr=args.create_pr,
            commit_message=args.commit_message, dtype=args.dtype, gguf_file=args.gguf_file,
            max_shard_size=args.max_shard_size, base_model=args.base_model, trust_remote_code=args.trust_remote_code,
        )
        print(report.to_json() if args.json else f"{report.output}\n\n{report.summary_table()}")
        return 0
    if args.command == "ckpt":
        return args.ckpt_run(args)
    if args.command == "examples":
        return _examples(args.name)
    if args.command == "verify":
        from tpde_hf.conversion.verify import verify_repo, write_checksums

        if args.write_checksums:
            result = write_checksums(args.repo, workers=args.workers)
        else:
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


def _examples(name: str | None) -> int:
    from tpde_hf.examples import example_path, installed_examples

    try:
        path = example_path(name) if name is not None else None
    except LookupError as exc:  # unknown, or not installed: the message says what to run
        print(f"tpde examples: error: {exc}", file=sys.stderr)
        return 1
    if path is not None:
        print(path)
        return 0
    found = installed_examples()
    if not found:
        print("tpde examples: error: no example model is installed: run ./scripts/setup.sh", file=sys.stderr)
        return 1
    for key, path in found.items():
        print(f"{key:<8} {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
