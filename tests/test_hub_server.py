"""Drive the real ``huggingface_hub`` client (and transformers) against the local hub.

Why: the hub server is only useful if the unmodified client accepts it, so every
behaviour is checked end to end. Clients that upload run in a subprocess because
``HF_ENDPOINT`` and ``HF_HUB_DISABLE_XET`` are read when ``huggingface_hub`` is imported;
read-only calls can also run in-process with ``HfApi(endpoint=hub.url)``.
"""

from __future__ import annotations

import hashlib
import json
import os
import textwrap
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import HUB_TOKEN, HUB_USER
from hub_server import ClientScriptError, LocalHubServer
from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.errors import RepositoryNotFoundError

TOKEN, USER = HUB_TOKEN, HUB_USER  # the conftest hub's account
BIG = 10 * 1024 * 1024 + 4096  # just over the Hub's 10 MB regular-file limit

RunClient = Callable[..., Any]


@pytest.fixture
def hub(local_hub: LocalHubServer) -> LocalHubServer:
    """conftest's ``local_hub``: it also fails the test on a route it does not serve or an internal error."""
    return local_hub


def _runner(hub: LocalHubServer, hf_home: Path) -> RunClient:
    def run(code: str, token: str | None = TOKEN, **kwargs: Any) -> Any:
        """Run ``code`` in a client subprocess; it must print one JSON document last."""
        out = hub.run_python(textwrap.dedent(code), hf_home=hf_home, token=token, **kwargs)
        return json.loads(out.strip().splitlines()[-1])

    return run


@pytest.fixture
def client(hub: LocalHubServer, tmp_path: Path) -> RunClient:
    return _runner(hub, tmp_path / "hf_home")


@pytest.fixture
def model_folder(tmp_path: Path) -> Path:
    """A folder with a small regular file and a >10 MB binary (must go through LFS)."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    (folder / "weights.bin").write_bytes(os.urandom(BIG))
    return folder


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


UPLOAD_FOLDER = """
    import json
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError
    api = HfApi()
    results = []
    for _ in range({attempts}):
        try:
            info = api.upload_folder(repo_id={repo!r}, folder_path={folder!r})
            results.append(info.oid)
        except HfHubHTTPError as err:
            results.append(err.response.status_code)
    print(json.dumps(results))
"""


def test_create_private_repo_upload_folder_and_download(
    hub: LocalHubServer, client: RunClient, model_folder: Path
) -> None:
    result = client(
        f"""
        import json, hashlib, pathlib
        from huggingface_hub import HfApi, snapshot_download
        from huggingface_hub.errors import RepositoryNotFoundError
        api = HfApi()
        url = api.create_repo("tiny", private=True)
        info = api.upload_folder(repo_id=url.repo_id, folder_path={str(model_folder)!r})
        model = api.model_info(url.repo_id, files_metadata=True)
        snap = pathlib.Path(snapshot_download(url.repo_id))
        try:
            api.model_info(url.repo_id, token=False)
            anonymous = "visible"
        except RepositoryNotFoundError:
            anonymous = "RepositoryNotFoundError"
        print(json.dumps({{
            "repo_id": url.repo_id,
            "oid": info.oid,
            "private": model.private,
            "sha": model.sha,
            "siblings": {{s.rfilename: (s.size, s.lfs.sha256 if s.lfs else None) for s in model.siblings}},
            "downloaded": {{p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in snap.iterdir()}},
            "anonymous": anonymous,
        }}))
        """
    )
    repo_id = f"{USER}/tiny"
    weights_sha = _sha256(model_folder / "weights.bin")
    assert result["repo_id"] == repo_id
    assert result["private"] is True
    assert result["sha"] == result["oid"]
    assert result["siblings"]["weights.bin"] == [BIG, weights_sha]
    assert result["siblings"]["config.json"][1] is None  # regular file, not LFS
    assert result["downloaded"]["weights.bin"] == weights_sha
    assert result["downloaded"]["config.json"] == _sha256(model_folder / "config.json")
    assert result["anonymous"] == "RepositoryNotFoundError"

    assert hub.is_lfs(repo_id, "weights.bin") and not hub.is_lfs(repo_id, "config.json")
    assert hub.file_content(repo_id, "weights.bin") == (model_folder / "weights.bin").read_bytes()
    assert hub.commit_count(repo_id) == 1
    assert hub.count_requests("/info/lfs/objects/batch") == 1
    assert hub.count_requests("/_storage/upload/", method="PUT") == 1
    assert hub.count_requests("/info/lfs/objects/verify") == 1
    # The LFS download went through the signed storage redirect, like the Hub's CDN.
    assert hub.count_requests("/_storage/blob/", method="GET") == 1


def test_branch_and_pull_request_commits(hub: LocalHubServer, client: RunClient) -> None:
    result = client(
        """
        import json, pathlib
        from huggingface_hub import CommitOperationAdd, HfApi, hf_hub_download, snapshot_download
        from huggingface_hub.errors import RevisionNotFoundError
        api = HfApi()
        repo = api.create_repo("branchy").repo_id
        main = api.upload_file(path_or_fileobj=b"v1", path_in_repo="a.txt", repo_id=repo)
        api.create_branch(repo, branch="dev")
        dev = api.create_commit(
            repo, operations=[CommitOperationAdd("dev.txt", b"dev only")], commit_message="dev", revision="dev"
        )
        pr = api.create_commit(
            repo, operations=[CommitOperationAdd("a.txt", b"v2 via PR")], commit_message="pr", create_pr=True
        )
        pr2 = api.create_commit(
            repo, operations=[CommitOperationAdd("b.txt", b"more")], commit_message="pr2", revision=pr.pr_revision
        )
        try:
            api.create_commit(
                repo, operations=[CommitOperationAdd("x.txt", b"x")], commit_message="x", revision="missing"
            )
            missing = "committed"
        except RevisionNotFoundError:
            missing = "RevisionNotFoundError"
        refs = api.list_repo_refs(repo, include_pull_requests=True)

        def snapshot(revision):
            folder = pathlib.Path(snapshot_download(repo, revision=revision))
            return {p.name: p.read_text() for p in folder.iterdir() if p.name != ".gitattributes"}

        print(json.dumps({
            "repo": repo,
            "main_oid": main.oid,
            "dev_oid": dev.oid,
            "pr_oid": pr2.oid,
            "pr_revision": pr.pr_revision,
            "pr_num": pr.pr_num,
            "missing": missing,
            "branches": {b.name: b.target_commit for b in refs.branches},
            "pulls": {p.ref: p.target_commit for p in refs.pull_requests},
            "main": snapshot("main"),
            "dev": snapshot("dev"),
            "pr": snapshot(pr.pr_revision),
            "one_file": pathlib.Path(hf_hub_download(repo, "dev.txt", revision="dev")).read_text(),
        }))
        """
    )
    assert result["missing"] == "RevisionNotFoundError"
    assert result["pr_revision"] == "refs/pr/1" and result["pr_num"] == 1
    assert result["branches"] == {"main": result["main_oid"], "dev": result["dev_oid"]}
    assert result["pulls"] == {"refs/pr/1": result["pr_oid"]}
    assert result["main"] == {"a.txt": "v1"}
    assert result["dev"] == {"a.txt": "v1", "dev.txt": "dev only"}
    assert result["pr"] == {"a.txt": "v2 via PR", "b.txt": "more"}
    assert result["one_file"] == "dev only"

    repo = result["repo"]
    assert hub.commit_count(repo) == 4  # main upload, dev commit, two PR commits
    assert [c["title"] for c in hub.commits(repo, "refs/pr/1")] == [
        "pr2",
        "pr",
        "Upload a.txt with huggingface_hub",
        "initial commit",
    ]
    assert hub.refs(repo)["pulls"] == {"refs/pr/1": result["pr_oid"]}


def test_bad_token_raises_the_clients_auth_error(hub: LocalHubServer, client: RunClient) -> None:
    hub.seed_repo(f"{USER}/public", {"config.json": b"{}"})
    result = client(
        f"""
        import json
        from huggingface_hub import HfApi, hf_hub_download
        from huggingface_hub.errors import HfHubHTTPError

        def outcome(fn):
            try:
                fn()
                return "ok"
            except HfHubHTTPError as err:
                return [type(err).__name__, err.response.status_code, str(err).splitlines()[0]]

        api = HfApi()
        print(json.dumps({{
            "whoami": outcome(api.whoami),
            "model_info": outcome(lambda: api.model_info("{USER}/public")),
            "download": outcome(lambda: hf_hub_download("{USER}/public", "config.json")),
            "create_repo": outcome(lambda: api.create_repo("new")),
        }}))
        """,
        token="hf_bad",
    )
    assert result["whoami"][:2] == ["HfHubHTTPError", 401]
    assert result["whoami"][2].startswith("Invalid user token.")
    for key in ("model_info", "download", "create_repo"):
        name, status, _ = result[key]
        assert (name, status) == ("HfHubHTTPError", 401), key  # an auth error, not RepositoryNotFoundError
    assert not hub.repo_exists(f"{USER}/new")


def test_missing_repo_raises_repository_not_found(client: RunClient) -> None:
    result = client(
        """
        import json
        from huggingface_hub import HfApi, hf_hub_download, snapshot_download

        def outcome(fn):
            try:
                fn()
                return "ok"
            except Exception as err:
                return type(err).__name__

        api = HfApi()
        print(json.dumps({
            "model_info": outcome(lambda: api.model_info("user/nope")),
            "download": outcome(lambda: hf_hub_download("user/nope", "config.json")),
            "snapshot": outcome(lambda: snapshot_download("user/nope")),
            "upload": outcome(lambda: api.upload_file(path_or_fileobj=b"x", path_in_repo="x", repo_id="user/nope")),
            "whoami": api.whoami()["name"],
        }))
        """
    )
    assert result == {
        "model_info": "RepositoryNotFoundError",
        "download": "RepositoryNotFoundError",
        "snapshot": "RepositoryNotFoundError",
        "upload": "RepositoryNotFoundError",
        "whoami": USER,
    }


def test_injected_500_on_lfs_upload_is_retried_by_the_client(
    hub: LocalHubServer, client: RunClient, model_folder: Path
) -> None:
    repo = f"{USER}/retry"
    hub.seed_repo(repo)
    hub.fail_next(1, "/_storage/upload/", status=500, method="PUT")
    oids = client(UPLOAD_FOLDER.format(attempts=1, repo=repo, folder=str(model_folder)))
    assert len(oids[0]) == 40  # the upload succeeded on the client's automatic retry
    assert hub.pending_failures() == 0
    puts = [r.status for r in hub.request_log if r.method == "PUT" and "/_storage/upload/" in r.path]
    assert puts == [500, 200]
    assert hub.commit_count(repo) == 1
    assert hub.file_content(repo, "weights.bin") == (model_folder / "weights.bin").read_bytes()


def test_failed_commit_then_second_push_recovers_without_duplicate(
    hub: LocalHubServer, client: RunClient, model_folder: Path
) -> None:
    repo = f"{USER}/recover"
    hub.seed_repo(repo)
    hub.fail_next(1, f"/api/models/{repo}/commit/", status=500)
    results = client(UPLOAD_FOLDER.format(attempts=3, repo=repo, folder=str(model_folder)))
    assert results[0] == 500  # the commit call is not retried by the client
    assert len(results[1]) == 40 and results[2] == results[1]  # third push is a no-op
    assert hub.commit_count(repo) == 1
    assert hub.count_requests("/_storage/upload/", method="PUT") == 1  # LFS object reused, not re-sent
    assert len(hub.commits(repo)) == 2  # initial commit + one upload


def test_lost_commit_response_then_second_push_is_a_noop(
    hub: LocalHubServer, client: RunClient, model_folder: Path
) -> None:
    repo = f"{USER}/lost"
    hub.seed_repo(repo)
    hub.fail_next(1, "/commit/main", status=500, when="after")  # commit lands, client sees a 500
    results = client(UPLOAD_FOLDER.format(attempts=2, repo=repo, folder=str(model_folder)))
    assert results[0] == 500
    assert results[1] == hub.commits(repo)[0]["oid"]  # second push found nothing to change
    assert hub.commit_count(repo) == 1


def test_multipart_lfs_upload(tmp_path: Path) -> None:
    data = os.urandom(5 * 1024 * 1024 // 2)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model.safetensors").write_bytes(data)
    with LocalHubServer(
        tokens={TOKEN}, root=tmp_path / "hub", multipart_threshold=1024 * 1024, multipart_chunk_size=1024 * 1024
    ) as hub:
        hub.seed_repo("user/multi")
        run = _runner(hub, tmp_path / "hf_home")
        run(UPLOAD_FOLDER.format(attempts=1, repo="user/multi", folder=str(tmp_path / "model")))
        assert hub.file_content("user/multi", "model.safetensors") == data
        assert hub.count_requests("/_storage/upload/", method="PUT") == 3
        assert hub.count_requests("/info/lfs/complete_multipart/", method="POST") == 1


def test_auto_create_branches_option(tmp_path: Path) -> None:
    """Opt-in convenience: commits to a missing branch create it from main (the Hub answers 404)."""
    with LocalHubServer(tokens={TOKEN}, root=tmp_path / "hub", auto_create_branches=True) as hub:
        hub.seed_repo("user/auto", {"a.txt": b"a"})
        run = _runner(hub, tmp_path / "hf_home")
        run(
            """
            from huggingface_hub import HfApi
            HfApi().upload_file(path_or_fileobj=b"b", path_in_repo="b.txt", repo_id="user/auto", revision="new")
            print("null")
            """
        )
        assert hub.list_files("user/auto", "new") == [".gitattributes", "a.txt", "b.txt"]
        assert hub.list_files("user/auto") == [".gitattributes", "a.txt"]


def test_transformers_autoconfig_from_pretrained(client: RunClient) -> None:
    client(
        """
        import json
        from huggingface_hub import HfApi
        config = {"model_type": "bert", "hidden_size": 16, "num_hidden_layers": 1,
                  "num_attention_heads": 2, "intermediate_size": 32, "vocab_size": 99}
        api = HfApi()
        repo = api.create_repo("tiny-bert").repo_id
        api.upload_file(path_or_fileobj=json.dumps(config).encode(), path_in_repo="config.json", repo_id=repo)
        print(json.dumps(repo))
        """
    )
    result = client(
        f"""
        import json
        from transformers import AutoConfig
        config = AutoConfig.from_pretrained("{USER}/tiny-bert")
        print(json.dumps([type(config).__name__, config.hidden_size, config.vocab_size]))
        """,
        timeout=300,
    )
    assert result == ["BertConfig", 16, 99]


def test_xet_uploads_fail_fast_unless_disabled(hub: LocalHubServer, client: RunClient) -> None:
    """The server has no Xet: a client with Xet enabled must fail quickly, not hang."""
    hub.seed_repo(f"{USER}/xet")
    code = f"""
        from huggingface_hub import HfApi
        HfApi().upload_file(path_or_fileobj=b"\\0" * 64, path_in_repo="w.bin", repo_id="{USER}/xet")
    """
    with pytest.raises(ClientScriptError, match="xet-write-token"):
        client(code, extra_env={"HF_HUB_DISABLE_XET": "0"}, timeout=60)
    assert hub.commit_count(f"{USER}/xet") == 0


def test_in_process_reads_with_endpoint_argument(hub: LocalHubServer, tmp_path: Path) -> None:
    repo = f"{USER}/inproc"
    hub.seed_repo(repo, {"config.json": b'{"a": 1}', "nested/w.bin": b"\0\1" * 100}, private=True)
    api = HfApi(endpoint=hub.url, token=TOKEN)
    assert api.list_repo_files(repo) == [".gitattributes", "config.json", "nested/w.bin"]
    assert api.model_info(repo).sha == hub.commits(repo)[0]["oid"]
    path = hf_hub_download(repo, "nested/w.bin", endpoint=hub.url, token=TOKEN, cache_dir=tmp_path / "cache")
    assert Path(path).read_bytes() == b"\0\1" * 100
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=hub.url, token=False).model_info(repo)


def test_error_shape_and_state_survive_restart(tmp_path: Path) -> None:
    with LocalHubServer(tokens={TOKEN}, root=tmp_path / "hub") as hub:
        head = hub.seed_repo("user/keep", {"a.txt": b"a"})
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(f"{hub.url}/api/models/user/missing")
        assert info.value.code == 404
        assert info.value.headers["X-Error-Code"] == "RepoNotFound"
        assert json.loads(info.value.read()) == {"error": "Repository not found"}
    with LocalHubServer(tokens={TOKEN}, root=tmp_path / "hub") as hub:
        assert hub.commits("user/keep")[0]["oid"] == head
        assert hub.file_content("user/keep", "a.txt") == b"a"
