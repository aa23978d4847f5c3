"""Push a converted folder to the Hub, and turn Hub errors into messages that say what to do.

Pushing is idempotent: before each commit attempt the remote revision is listed and compared
with the local files (sha256 for LFS files, git blob id for the others). Only changed files are
sent, stale files (e.g. shards of an earlier conversion) are deleted, and an attempt whose commit
landed although the client saw an error (a lost response) is recognised on retry, so retries never
duplicate a commit. Large files go through the client's LFS / Xet upload, which skips blobs the
server already has.

Example::

    push_to_hub("smollm2-tpde", "me/smollm2-tpde", private=True)
    push_to_hub("smollm2-tpde", "me/smollm2-tpde", revision="v2")       # a branch
    push_to_hub("smollm2-tpde", "org/smollm2-tpde", create_pr=True)    # a pull request
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from tpde_hf.conversion.errors import ConversionError, HubAccessError
from tpde_hf.format import CONFIG_NAME, CONVERSION_REPORT_NAME, MANIFEST_NAME, QUANT_METHOD

logger = logging.getLogger("tpde_hf.conversion")

_REGULAR_LIMIT = 10 * 1024 * 1024  # larger files are always LFS on the Hub


@dataclass
class PushResult:
    """Outcome of :func:`push_to_hub`. ``commit`` is None when the remote already had these files."""

    repo_id: str
    revision: str
    commit: str | None
    url: str
    pr_url: str | None = None
    files_uploaded: int = 0
    files_deleted: int = 0
    attempts: int = 1

    @property
    def changed(self) -> bool:
        return self.commit is not None


def _endpoint(endpoint: str | None) -> str:
    from huggingface_hub import constants

    return (endpoint or constants.ENDPOINT).rstrip("/")


def explain_hub_error(exc: BaseException, repo_id: str, revision: str | None = None, what: str = "repo",
                      endpoint: str | None = None) -> HubAccessError:
    """A :class:`HubAccessError` whose message names the repo and the fix, from a huggingface_hub error."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = _endpoint(endpoint)
    status = getattr(getattr(exc, "response", None), "status_code", None)
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if status == 401 and "Invalid credentials" in str(exc):
        msg = (f"{what} {repo_id}: the Hub at {where} rejected the token (401 invalid credentials). Pass a valid "
               "token (token= / --token), set HF_TOKEN, or run `hf auth login`.")
    elif isinstance(exc, GatedRepoError):
        msg = f"{what} {repo_id} is gated: accept its conditions on the Hub and use a token of that account"
    elif isinstance(exc, RevisionNotFoundError):
        msg = f"{what} {repo_id}: revision {revision!r} not found on {where}"
    elif isinstance(exc, RepositoryNotFoundError):
        msg = (f"{what} {repo_id} not found on {where} (or it is private and the token cannot read it). Check the "
               "repo id, or pass a token with access (token= / --token / HF_TOKEN).")
    elif status == 401:
        msg = f"{what} {repo_id}: authentication required on {where}; pass a token (token= / --token / HF_TOKEN)"
    elif status == 403:
        msg = (f"{what} {repo_id}: the token may not write here (403 forbidden): use a token with write access to "
               "this namespace")
    elif isinstance(exc, LocalEntryNotFoundError):
        msg = f"{what} {repo_id}: cannot reach {where} and the files are not in the local cache ({text})"
    elif isinstance(exc, HfHubHTTPError):
        msg = f"{what} {repo_id}: the Hub at {where} answered {status}: {text}"
    else:
        msg = f"{what} {repo_id}: {type(exc).__name__}: {text}"
    return HubAccessError(msg)


def _retryable(exc: BaseException) -> bool:
    from huggingface_hub.errors import HfHubHTTPError

    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(exc, HfHubHTTPError):
        return status is not None and (status >= 500 or status == 429)
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    return type(exc).__module__.split(".")[0] in ("httpx", "httpx2", "httpcore", "httpcore2")


def _file_hashes(path: Path) -> tuple[str, str | None]:
    """(sha256, git blob sha1 or None for files too large to be regular on the Hub)."""
    size = path.stat().st_size
    sha = hashlib.sha256()
    git = hashlib.sha1(b"blob %d\0" % size) if size < _REGULAR_LIMIT else None
    with open(path, "rb") as f:
        while block := f.read(8 * 1024 * 1024):
            sha.update(block)
            if git is not None:
                git.update(block)
    return sha.hexdigest(), git.hexdigest() if git else None


def _check_folder(folder: Path) -> None:
    cfg = folder / CONFIG_NAME
    if not folder.is_dir():
        raise ConversionError(f"{folder}: no such folder")
    try:
        qc = json.loads(cfg.read_text()).get("quantization_config") or {}
    except (OSError, ValueError) as exc:
        raise ConversionError(f"{cfg}: not a converted tpde folder ({exc}); run `tpde convert` first") from None
    if qc.get("quant_method") != QUANT_METHOD or not (folder / MANIFEST_NAME).is_file():
        raise ConversionError(f"{folder}: not a converted tpde folder (no tpde quantization_config or "
                              f"{MANIFEST_NAME}); run `tpde convert` first")


def _local_files(folder: Path) -> dict[str, Path]:
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_file() and not any(part.startswith(".") for part in Path(rel).parts):
            out[rel] = p
    return out


def _card_bytes(folder: Path, repo_id: str) -> bytes | None:
    """README re-rendered with the target repo id in its snippets (the local file is left as it is)."""
    report_path = folder / CONVERSION_REPORT_NAME
    if not report_path.is_file():
        return None
    from tpde_hf.conversion.card import render_card
    from tpde_hf.conversion.report import ConversionReport

    try:
        report = ConversionReport.from_dict(json.loads(report_path.read_text()))
        from huggingface_hub import ModelCard

        old = ModelCard.load(folder / "README.md", ignore_metadata_errors=True).data.to_dict() \
            if (folder / "README.md").is_file() else {}
        card = render_card(report, repo_id=repo_id, source_meta=old, base_model=old.get("base_model"))
        return str(card).encode()
    except Exception as exc:  # the existing README is still a fine card
        logger.warning("could not re-render the model card for %s (%s); pushing README.md as is", repo_id, exc)
        return None


def push_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    token: str | bool | None = None,
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
    endpoint: str | None = None,
    max_retries: int = 3,
    retry_wait: float = 2.0,
) -> PushResult:
    """Upload a converted folder to ``repo_id`` (created if missing) in one commit; retry on failure.

    Args:
        folder: the output of :func:`~tpde_hf.conversion.convert`.
        repo_id: ``namespace/name`` (or ``name`` for the token's own namespace).
        token: Hub token; None uses the usual places (``HF_TOKEN``, ``hf auth login``).
        private: create the repo private (an existing repo keeps its visibility).
        revision: branch to commit to (created from main if missing), or the base of the PR.
        create_pr: open a pull request instead of committing to the branch.
        max_retries, retry_wait: retries (exponential backoff) on 5xx / 429 / connection errors.

    Raises:
        HubAccessError: bad token, no write access, missing repo or revision, persistent server errors.
    """
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

    folder = Path(folder)
    _check_folder(folder)
    api = HfApi(endpoint=endpoint, token=token)
    try:
        url = api.create_repo(repo_id, private=True if private else None, exist_ok=True)  # None: the default
        repo_id = url.repo_id or repo_id
        if revision and not create_pr:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
    except Exception as exc:
        raise explain_hub_error(exc, repo_id, revision, "target repo", endpoint) from exc
    branch = revision or "main"

    local = _local_files(folder)
    card = _card_bytes(folder, repo_id)
    hashes = {rel: _file_hashes(p) for rel, p in local.items()}
    if card is not None:
        hashes["README.md"] = (hashlib.sha256(card).hexdigest(),
                               hashlib.sha1(b"blob %d\0" % len(card) + card).hexdigest())
    prs_before = _pr_refs(api, repo_id) if create_pr else {}
    message = commit_message or f"Upload tpde conversion ({len(local)} files)"

    last: BaseException | None = None
    for attempt in range(max_retries + 1):
        try:
            if create_pr and attempt:
                # A PR that landed although the client saw an error is ours if it holds exactly our files.
                for ref, oid in _pr_refs(api, repo_id).items():
                    if ref not in prs_before and _diff(api, repo_id, ref, hashes)[:2] == ([], []):
                        return PushResult(repo_id, ref, oid, _repo_url(api, repo_id), _pr_url(api, repo_id, ref),
                                          attempts=attempt + 1)
            changed, stale, head = _diff(api, repo_id, branch, hashes)
            if not changed and not stale:
                logger.info("%s@%s already holds these files; nothing to push", repo_id, branch)
                return PushResult(repo_id, branch, None, _repo_url(api, repo_id), attempts=attempt + 1)
            ops: list = [
                CommitOperationAdd(path_in_repo=rel, path_or_fileobj=card if rel == "README.md" and card is not None
                                   else str(local[rel]))
                for rel in changed
            ]
            ops += [CommitOperationDelete(path_in_repo=rel) for rel in stale]
            info = api.create_commit(repo_id, operations=ops, commit_message=message, revision=branch,
                                     create_pr=create_pr, parent_commit=head)
            return PushResult(repo_id, branch, info.oid, _repo_url(api, repo_id), info.pr_url,
                              files_uploaded=len(changed), files_deleted=len(stale), attempts=attempt + 1)
        except Exception as exc:
            if not _retryable(exc) or attempt == max_retries:
                raise explain_hub_error(exc, repo_id, branch, "target repo", endpoint) from exc
            last = exc
            wait = retry_wait * 2**attempt
            logger.warning("push to %s failed (%s); retrying in %.0f s [%d/%d]", repo_id, exc, wait, attempt + 1,
                           max_retries)
            time.sleep(wait)
    raise explain_hub_error(last or RuntimeError("push failed"), repo_id, branch, "target repo", endpoint)


def _repo_url(api, repo_id: str) -> str:
    return f"{api.endpoint.rstrip('/')}/{repo_id}"


def _pr_url(api, repo_id: str, ref: str) -> str:
    return f"{_repo_url(api, repo_id)}/discussions/{ref.rsplit('/', 1)[-1]}"


def _pr_refs(api, repo_id: str) -> dict[str, str]:
    refs = api.list_repo_refs(repo_id, include_pull_requests=True)
    return {r.ref: r.target_commit for r in (refs.pull_requests or [])}


def _diff(api, repo_id: str, revision: str, hashes: dict[str, tuple[str, str | None]]):
    """(files to upload, remote files to delete, head commit) against ``revision``."""
    head = api.repo_info(repo_id, revision=revision).sha
    remote = {}
    for entry in api.list_repo_tree(repo_id, recursive=True, revision=head):
        if getattr(entry, "blob_id", None) is None:  # a folder
            continue
        lfs = getattr(entry, "lfs", None)
        remote[entry.path] = (lfs.sha256 if lfs else None, entry.blob_id)
    changed = []
    for rel, (sha, git) in hashes.items():
        have = remote.get(rel)
        same = have is not None and ((have[0] is not None and have[0] == sha) or (have[0] is None and have[1] == git))
        if not same:
            changed.append(rel)
    stale = sorted(p for p in remote if p not in hashes and p != ".gitattributes")
    return changed, stale, head
