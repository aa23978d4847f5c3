"""``tpde ckpt``: list, pack and restore checkpoints stored as exact deltas.

Examples::

    tpde ckpt ls out/                          # every checkpoint: packed or not, parent, sizes
    tpde ckpt pack out/                        # pack every plain checkpoint-N folder of out/, oldest first
    tpde ckpt pack out/ --backward             # the newest stays plain, older ones deltas against the next
    tpde ckpt pack out/checkpoint-40           # pack one folder (a delta against the newest earlier entry)
    tpde ckpt restore out/checkpoint-40        # put model.safetensors, optimizer.pt back, byte for byte
    tpde ckpt restore out/checkpoint-40 --out plain/   # a full plain copy elsewhere

Exit status: 0 success, 1 bad or corrupt input (one line on stderr naming the file).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``ckpt`` on the ``tpde`` command line (called by :mod:`tpde_hf.conversion.cli`)."""
    from tpde_hf.checkpoints.api import DEFAULT_KEYFRAME_EVERY

    p = sub.add_parser("ckpt", help="training checkpoints as exact deltas: ls, pack, restore",
                       description="Training checkpoints stored as exact deltas against the previous checkpoint "
                                   "(see TpdeCheckpointCallback).")
    s = p.add_subparsers(dest="ckpt_command", required=True, metavar="ACTION", help="ls, pack or restore")
    ls = s.add_parser("ls", help="list the checkpoints of a training output folder")
    ls.add_argument("folder", metavar="OUTPUT_DIR", help="a training output folder (with checkpoint-N folders)")
    ls.add_argument("--json", action="store_true", help="print JSON")
    pk = s.add_parser("pack", help="pack a checkpoint-N folder, or every plain one of OUTPUT_DIR")
    pk.add_argument("folder", metavar="DIR", help="one checkpoint-N folder, or an output folder: all its plain ones")
    pk.add_argument("--keyframe-every", type=int, default=DEFAULT_KEYFRAME_EVERY, metavar="K",
                    help=f"a full keyframe every K checkpoints (default {DEFAULT_KEYFRAME_EVERY})")
    pk.add_argument("--backward", action="store_true",
                    help="OUTPUT_DIR only: keep the newest checkpoint plain and store each older one as a delta "
                         "against the next later one (what TpdeCheckpointCallback does by default)")
    rs = s.add_parser("restore", help="write a packed checkpoint's files back, byte for byte")
    rs.add_argument("folder", metavar="CHECKPOINT_DIR", help="a packed checkpoint-N folder")
    rs.add_argument("--out", default=None, metavar="DIR", help="write a full plain copy here instead")
    p.set_defaults(ckpt_run=run)


def run(args: argparse.Namespace) -> int:
    """Run ``tpde ckpt``: 0 on success, 1 with one line on stderr for bad or corrupt input."""
    try:
        return _run(args)
    except (ValueError, OSError) as exc:  # TpdeFormatError is a ValueError naming the file
        print(f"tpde ckpt {args.ckpt_command}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    from tpde_hf.checkpoints import api

    folder = Path(args.folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder")
    if args.ckpt_command == "ls":
        rows = listing(folder)
        if args.json:
            print(json.dumps(rows, indent=1))
        else:
            print(f"{'checkpoint':<22} {'state':<9} {'parent':<22} {'stored MB':>10} {'raw MB':>9} {'ratio':>6}")
            for r in rows:
                ratio = f"{r['stored'] / r['raw']:.3f}" if r["raw"] else "-"
                print(f"{r['name']:<22} {r['state']:<9} {r['parent'] or '-':<22} {r['stored'] / 1e6:>10.1f} "
                      f"{r['raw'] / 1e6:>9.1f} {ratio:>6}")
        return 0
    if args.ckpt_command == "pack":
        one = not any(d.is_dir() for d in folder.glob("checkpoint-*"))
        if one and args.backward:
            raise ValueError(f"{folder}: --backward packs a whole output folder (each checkpoint against the next)")
        res = [api.pack(folder, keyframe_every=args.keyframe_every)] if one \
            else api.pack_all(folder, keyframe_every=args.keyframe_every, backward=args.backward)
        for r in res:
            print(f"{r.name}: {r.stored_bytes / 1e6:.1f} MB of {r.raw_bytes / 1e6:.1f} MB "
                  f"({'keyframe' if r.parent is None else 'delta of ' + r.parent})")
        return 0
    written = api.restore(folder, out=args.out)
    for p in written:
        print(p)
    return 0


def listing(output_dir: Path) -> list[dict]:
    """One row per ``checkpoint-*`` folder (packed or plain) and per store entry without a folder."""
    from tpde_hf.checkpoints import api
    from tpde_hf.checkpoints import store as S

    rows = []
    root = output_dir / S.STORE_DIRNAME
    mans = dict(S.entries(root)) if root.exists() else {}
    seen = set()
    for d in sorted(output_dir.glob("checkpoint-*"), key=lambda d: api._step(d.name) or 0):
        if not d.is_dir():
            continue
        if api.is_packed(d):
            name = d.name
            man = mans.get(name)
            seen.add(name)
            kept = sum(p.stat().st_size for p in d.iterdir() if p.is_file())  # small files stay in the folder
            stored = kept + (S.entry_path(root, name).stat().st_size if man else 0)
            raw = sum(f["size"] for f in man["files"]) if man else 0
            rows.append({"name": d.name, "state": "packed" if man else "BROKEN", "parent": (man or {}).get("parent"),
                         "stored": stored, "raw": raw})
        else:
            size = sum(p.stat().st_size for p in d.iterdir() if p.is_file())
            rows.append({"name": d.name, "state": "plain", "parent": None, "stored": size, "raw": size})
    for name, man in mans.items():
        if name not in seen:
            rows.append({"name": name, "state": "orphan", "parent": man.get("parent"),
                         "stored": S.entry_path(root, name).stat().st_size,
                         "raw": sum(f["size"] for f in man["files"])})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tpde")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
