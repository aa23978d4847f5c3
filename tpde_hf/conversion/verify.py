"""``verify_repo``: prove that a tpde repo (local or on the Hub) holds its original tensors bit for bit.

Checks, against ``tpde_manifest.json``:

* every original tensor is present: dense ones as stored, converted ones as their 7 parts;
* no stored tensor is unaccounted for;
* dense tensors: dtype, shape and BLAKE2b checksum of the stored bytes;
* converted tensors: every part validates, the decoded weight has the manifest's dtype and shape,
  and its checksum matches both the manifest and the tensor's own ``meta``;
* the per-tensor xxh3 checksums in the shard headers (:mod:`tpde_hf.integrity`), which every load
  checks, match the stored bytes (repos written before them have none: :func:`write_checksums`
  adds them after a full verification).

Decoding runs in worker processes, in batches (one tensor file region at a time in memory).

Example::

    report = verify_repo("me/smollm2-tpde")     # downloads through the HF cache
    assert report.ok, report.failures
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path

from tpde_hf.codec import EncodedTensor, decode_tensors, tensor_checksum
from tpde_hf.conversion.errors import ConversionError, VerificationError
from tpde_hf.conversion.streaming import TensorInfo, bytes_checksum, iter_bytes, load_tensor, read_header
from tpde_hf.conversion.worker import init_worker
from tpde_hf.errors import TpdeFormatError
from tpde_hf.format import (
    CONFIG_NAME,
    MANIFEST_NAME,
    QUANT_METHOD,
    SUFFIXES,
    dtype_name,
    validate_manifest,
)
from tpde_hf.integrity import ALGO, CONFIG_FIELD, add_repo_checksums, hash_stored, read_shard_header, repo_weight_files
from tpde_hf.storage_format import entry_failures, expected_part_keys, split_suffixes

VERIFY_TASK_ELEMENTS = 1 << 20
# The in-process decoder already uses every core; on 2 cores one process verified faster than two even
# for a 1.2 GB model (137 vs 126 MB/s), so processes only pay off for big repos on big machines.
PARALLEL_MIN_BYTES = 4 * 1024**3


@dataclass
class VerificationReport:
    """Result of :func:`verify_repo`; ``ok`` when ``failures`` is empty."""

    repo: str
    folder: str
    n_tensors: int = 0
    n_encoded: int = 0
    n_dense: int = 0
    bytes_checked: int = 0
    seconds: float = 0.0
    workers: int = 1
    checksums: str = "absent"  # the shard headers' per-tensor checksums: "xxh3_64", "absent" or "not checked"
    checksums_written: bool = False  # write_checksums added them
    cast_from: str | None = None  # quantization_config.cast_from: the manifest describes the source cast, not it
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "ok": self.ok}, indent=2)

    def summary(self) -> str:
        status = "OK" if self.ok else f"FAILED ({len(self.failures)} problems)"
        lines = [f"{self.repo}: {status} -- {self.n_encoded} converted tensors decoded bit-exact, "
                 f"{self.n_dense} dense tensors checksummed, {self.bytes_checked / 1e6:.1f} MB in "
                 f"{self.seconds:.1f} s ({self.workers} worker{'s' if self.workers != 1 else ''})",
                 f"  per-tensor checksums: {self.checksums}" + (" (written now)" if self.checksums_written else "")
                 + (f"; add them with `tpde verify --write-checksums {self.folder}`"
                    if self.ok and self.checksums == "absent" else "")]
        if self.cast_from:
            lines.append(f"  reference: the source cast from {self.cast_from} at conversion (--dtype); the manifest "
                         "holds the cast tensors, and the repo is checked against them")
        lines += [f"  - {f}" for f in self.failures[:50]]
        if len(self.failures) > 50:
            lines.append(f"  ... and {len(self.failures) - 50} more")
        return "\n".join(lines)


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a repo folder: from its index, or ``model.safetensors``, or all of them."""
    try:
        return repo_weight_files(folder)
    except TpdeFormatError as exc:
        raise VerificationError(str(exc), [str(exc)]) from None


def _verify_encoded(items: list[tuple[str, dict, dict[str, TensorInfo]]]) -> tuple[list[str], int]:
    """Decode a batch of converted tensors; ``items``: (name, manifest entry, part infos). Returns failures."""
    failures: list[str] = []
    encs, entries = [], []
    nbytes = 0
    for name, entry, parts in items:
        if (storage := split_suffixes(parts)[0]) is not None:  # laid out by a base storage
            loaded = {p: load_tensor(info) for p, info in split_suffixes(parts)[1].items()}
            nbytes += sum(p.nbytes for p in parts.values())
            failures += entry_failures(name, storage, loaded, entry)
            continue
        try:
            loaded = {s: load_tensor(parts[s]) for s in SUFFIXES}
            nbytes += sum(p.nbytes for p in parts.values())
            enc = EncodedTensor.from_parts(name=name, **loaded)
        except TpdeFormatError as exc:
            failures.append(f"{name}: {exc}")
            continue
        if enc.checksum != entry["checksum"]:
            failures.append(f"{name}: its meta checksum differs from the manifest")
            continue
        if dtype_name(enc.dtype) != entry["dtype"] or list(enc.shape) != entry["shape"]:
            failures.append(f"{name}: stored as {dtype_name(enc.dtype)}{list(enc.shape)}, manifest says "
                            f"{entry['dtype']}{entry['shape']}")
            continue
        encs.append(enc)
        entries.append(entry)
    try:
        decoded = decode_tensors(encs, verify=False)
    except TpdeFormatError as exc:  # one corrupt tensor fails the batch: retry one by one to name it
        if len(encs) == 1:
            return failures + [f"{encs[0].name}: {exc}"], nbytes
        for enc, entry in zip(encs, entries, strict=True):
            try:
                w = decode_tensors([enc])[0]
                if tensor_checksum(w) != entry["checksum"]:
                    failures.append(f"{enc.name}: decoded weight differs from the original (checksum mismatch)")
            except TpdeFormatError as one:
                failures.append(f"{enc.name}: {one}")
        return failures, nbytes
    for enc, entry, w in zip(encs, entries, decoded, strict=True):
        if tensor_checksum(w) != entry["checksum"]:
            failures.append(f"{enc.name}: decoded weight differs from the original (checksum mismatch)")
    return failures, nbytes


def _verify_task(batch: list[tuple[str, dict, dict[str, TensorInfo]]]) -> tuple[list[str], int, int]:
    from tpde_hf.format import expert_entry_failures  # a 3-D expert tensor: one tpde weight per expert, by key

    failures, nbytes = _verify_encoded([b for b in batch if len(b[1]["shape"]) != 3])
    for name, entry, parts in (b for b in batch if len(b[1]["shape"]) == 3):
        failures += expert_entry_failures(name, entry, lambda k, p=parts: load_tensor(p[k]), parts)
        nbytes += sum(p.nbytes for p in parts.values())
    return failures, nbytes, len(batch)


def resolve_repo(repo: str | os.PathLike, *, revision: str | None = None, token: str | bool | None = None,
                 endpoint: str | None = None, cache_dir: str | os.PathLike | None = None) -> Path:
    """A local folder as is; a Hub repo id downloaded (whole repo) through the HF cache."""
    path = Path(repo).expanduser()
    if path.is_dir():
        return path
    if path.exists() or str(repo).startswith((".", "/", "~")) or str(repo).count("/") > 1:
        raise ConversionError(f"{repo}: not a folder and not a Hub repo id")
    from huggingface_hub import snapshot_download

    from tpde_hf.conversion.hub import explain_hub_error

    try:
        return Path(snapshot_download(str(repo), revision=revision, token=token, endpoint=endpoint,
                                      cache_dir=cache_dir))
    except Exception as exc:
        raise explain_hub_error(exc, str(repo), revision, "repo", endpoint) from exc


def verify_repo(
    repo: str | os.PathLike,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    workers: int | None = None,
    endpoint: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    raise_on_error: bool = True,
    stored_checksums: bool = True,
) -> VerificationReport:
    """Re-check every tensor of a tpde repo (local folder or Hub repo id) against its manifest.

    ``stored_checksums=False`` leaves out the shard headers' xxh3 checksums (:func:`write_checksums`
    replaces them, so damaged ones must not stop it).

    Raises :class:`VerificationError` listing the failures (unless ``raise_on_error=False``, which
    returns them in the report), or :class:`HubAccessError` if the repo cannot be downloaded.

    Example::

        verify_repo("./smollm2-tpde").summary()
    """
    from huggingface_hub.utils import tqdm as hf_tqdm

    t0 = time.perf_counter()
    folder = resolve_repo(repo, revision=revision, token=token, endpoint=endpoint, cache_dir=cache_dir)
    report = VerificationReport(repo=str(repo), folder=str(folder))
    fail = report.failures
    cfg_path = folder / CONFIG_NAME
    qc: dict = {}
    try:
        qc = json.loads(cfg_path.read_text()).get("quantization_config") or {}
        report.cast_from = qc.get("cast_from")
        if qc.get("quant_method") != QUANT_METHOD:
            fail.append(f"{cfg_path}: quantization_config.quant_method is {qc.get('quant_method')!r}, not "
                        f"{QUANT_METHOD!r}")
    except (OSError, ValueError) as exc:
        fail.append(f"{cfg_path}: unreadable ({exc})")
    man_path = folder / MANIFEST_NAME
    try:
        manifest = validate_manifest(json.loads(man_path.read_text()), str(man_path))
    except (OSError, ValueError) as exc:
        fail.append(f"{man_path}: {exc}")
        return _finish(report, t0, raise_on_error)

    stored: dict[str, TensorInfo] = {}
    for f in weight_files(folder):
        try:
            for name, info in read_header(f).items():
                if name in stored:
                    fail.append(f"{name}: stored twice ({stored[name].file.name} and {f.name})")
                stored[name] = info
        except (OSError, TpdeFormatError) as exc:
            fail.append(f"{f}: {exc}")
    accounted: set[str] = set()
    dense: list[tuple[str, dict, TensorInfo]] = []
    encoded: list[tuple[str, dict, dict[str, TensorInfo]]] = []
    from tpde_hf.reference.verify import verify_reference_coded

    ref_coded = verify_reference_coded(qc, manifest, stored, fail)  # a fine-tune stored as deltas to its base
    for name, entry in manifest.items():
        if name in ref_coded:
            accounted.update(ref_coded[name])
            continue
        if entry["encoded"]:
            prefix = name[: -len(".weight")] if name.endswith(".weight") else name
            keys = expected_part_keys(stored, prefix)  # the resident tensors, or a base storage's parts
            if len(entry["shape"]) == 3:  # MoE experts stored as one 3-D tensor: one tpde weight per expert
                from tpde_hf.format import expert_part_keys

                keys = {k: k for k in expert_part_keys(name, entry["shape"][0], stored)}
            missing = [k for k in keys.values() if k not in stored]
            if missing:
                fail.append(f"{name}: missing stored tensors {missing}")
                continue
            accounted.update(keys.values())
            encoded.append((name, entry, {s: stored[k] for s, k in keys.items()}))
        else:
            info = stored.get(name)
            if info is None:
                fail.append(f"{name}: missing")
                continue
            accounted.add(name)
            if info.torch_dtype_name != entry["dtype"] or list(info.shape) != entry["shape"]:
                fail.append(f"{name}: stored as {info.torch_dtype_name}{list(info.shape)}, manifest says "
                            f"{entry['dtype']}{entry['shape']}")
                continue
            dense.append((name, entry, info))
    report.checksums = _check_stored_checksums(folder, qc, fail) if stored_checksums else "not checked"
    extra = sorted(set(stored) - accounted)
    if extra:
        fail.append(f"tensors not in the manifest: {extra[:10]}{' ...' if len(extra) > 10 else ''}")
    report.n_tensors, report.n_encoded, report.n_dense = len(manifest), len(encoded) + len(ref_coded), len(dense)

    total = sum(i.nbytes for _, _, i in dense) + sum(p.nbytes for _, _, ps in encoded for p in ps.values())
    bar = hf_tqdm(total=total, unit="B", unit_scale=True, desc="Verifying", name="tpde_hf")
    try:
        for name, entry, info in dense:
            if bytes_checksum(iter_bytes(info)) != entry["checksum"]:
                fail.append(f"{name}: checksum mismatch (dense tensor differs from the original)")
            report.bytes_checked += info.nbytes
            bar.update(info.nbytes)
        batches = _batches(encoded)
        enc_bytes = sum(p.nbytes for _, _, ps in encoded for p in ps.values())
        n_cpu = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        if workers is None:
            workers = n_cpu if enc_bytes >= PARALLEL_MIN_BYTES else 1
        report.workers = workers = max(1, min(workers, len(batches) or 1))
        if workers == 1:
            results = (_verify_task(b) for b in batches)
            for failures, nbytes, _ in results:
                fail.extend(failures)
                report.bytes_checked += nbytes
                bar.update(nbytes)
        else:
            with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=init_worker,
                                     initargs=(max(1, n_cpu // workers),)) as pool:
                pending = {pool.submit(_verify_task, b) for b in batches}
                while pending:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in done:
                        failures, nbytes, _ = fut.result()
                        fail.extend(failures)
                        report.bytes_checked += nbytes
                        bar.update(nbytes)
    finally:
        bar.close()
    return _finish(report, t0, raise_on_error)


def _check_stored_checksums(folder: Path, qc: dict, fail: list[str]) -> str:
    """Compare every shard's bytes with the xxh3 checksums in its header; return what the shards carry."""
    present = absent = 0
    for f in weight_files(folder):
        try:
            head = read_shard_header(f)
            sums = head.checksums()
        except (OSError, TpdeFormatError) as exc:
            fail.append(f"{f}: {exc}")
            continue
        if sums is None:
            absent += 1
            if qc.get(CONFIG_FIELD):
                fail.append(f"{f}: config.json says every shard carries {qc[CONFIG_FIELD]} checksums, but this one "
                            "has none (damaged header)")
            continue
        present += 1
        for name in sorted(set(head.tensors) ^ set(sums)):
            fail.append(f"{name}: {'no checksum' if name in head.tensors else 'a checksum but no tensor'} in {f.name}")
        got = hash_stored(head, [n for n in head.tensors if n in sums])
        fail.extend(f"{n}: stored bytes differ from the {ALGO} checksum in {f.name}"
                    for n in sorted(got) if got[n] != sums[n])
    return ALGO if present and not absent else "absent" if not present else f"in {present} of {present + absent} shards"


def write_checksums(repo: str | os.PathLike, *, workers: int | None = None) -> VerificationReport:
    """Verify a local repo fully, then add per-tensor checksums to its shard headers (``--write-checksums``).

    For repos written before tpde-hf stored checksums: afterwards every load checks the stored bytes.
    Nothing is written unless the verification passes (the report lists the failures); each shard is
    rewritten through a temporary file in its folder (synced, then renamed over it), with its data
    streamed, and ``config.json`` records ``quantization_config.integrity`` last.

    Example::

        report = write_checksums("./old-tpde-repo")
        assert report.ok and report.checksums_written
    """
    folder = Path(repo).expanduser()
    if not folder.is_dir():
        raise ConversionError(f"{repo}: --write-checksums rewrites the shards in place, so it needs a local folder "
                              "(download a Hub repo first: `hf download REPO_ID --local-dir DIR`)")
    links = [f for f in weight_files(folder) if f.is_symlink()]
    if links:
        raise ConversionError(f"{links[0]} is a symlink (a Hugging Face cache snapshot?); --write-checksums rewrites "
                              "files in place: copy the repo to a folder of its own first")
    report = verify_repo(folder, workers=workers, raise_on_error=False, stored_checksums=False)
    if report.ok:
        add_repo_checksums(folder)
        report.checksums, report.checksums_written = ALGO, True
    return report


def _batches(encoded: list) -> list[list]:
    out: list[list] = []
    size = 0
    for item in encoded:
        n = _numel(item[1])
        if out and size + n <= VERIFY_TASK_ELEMENTS:
            out[-1].append(item)
            size += n
        else:
            out.append([item])
            size = n
    return out


def _numel(entry: dict) -> int:
    n = 1
    for s in entry["shape"]:
        n *= s
    return n


def _finish(report: VerificationReport, t0: float, raise_on_error: bool) -> VerificationReport:
    report.seconds = time.perf_counter() - t0
    if report.failures and raise_on_error:
        raise VerificationError(report.summary(), report.failures)
    return report
