"""``tpde convert SOURCE OUT --reference BASE[@REV]``: the CLI side of a delta conversion.

Example::

    tpde convert ./my-finetune ./my-finetune-tpde --reference HuggingFaceTB/SmolLM2-135M@main
"""

from __future__ import annotations

import argparse
import json


def run_convert(args: argparse.Namespace, keep_dense: tuple[str, ...]) -> int:
    """Run the delta conversion for parsed ``tpde convert`` arguments; print a summary (or JSON)."""
    from tpde_hf.reference.convert import convert_with_reference

    summary = convert_with_reference(
        args.source, args.output, args.reference, token=args.token, overwrite=args.overwrite,
        push_to_hub=args.push_to_hub, private=args.private, push_revision=args.push_revision,
        create_pr=args.create_pr, commit_message=args.commit_message, revision=args.revision,
        group_size=args.group_size,
        delta_code=args.delta_code, keep_dense=keep_dense, include=args.include, exclude=args.exclude,
        workers=args.workers, verify=args.verify, dtype=args.dtype, gguf_file=args.gguf_file,
        max_shard_size=args.max_shard_size, base_model=args.base_model, trust_remote_code=args.trust_remote_code,
        **{k: getattr(args, k) for k in ("storage", "base_quantizer") if getattr(args, k, None) is not None},
    )
    if args.json:
        print(json.dumps(summary, indent=1))
        return 0
    r = summary["reference"]
    where = f"{r['model']}@{r['commit']}" if r.get("commit") else r["model"]
    kinds = ", ".join(f"{n} {k}" for k, n in sorted(r["stored_as"].items()))
    pushed = summary.get("push")
    if pushed:
        print(f"pushed to {summary['pushed_to']} (revision {pushed['revision']}, commit {pushed['commit']})"
              + (f": {pushed['pr_url']}" if pushed.get("pr_url") else ""))
    print(f"{args.output}\n\nreference: {where}\n{r['weights']:,} weights, {r['source_bytes'] / 1e6:.2f} MB -> "
          f"{r['stored_bytes'] / 1e6:.2f} MB ({r['bits_per_weight']:.3f} bits per weight); tensors: {kinds}")
    return 0
