"""Every HubError template, asserted in full: what failed, where, and the fix in the inventory's own words.

The templates are triggered through huggingface_hub against the local Hub server wherever the server can
produce the condition; the two the server cannot (a 5xx on the API, a size mismatch after a download) go
through map_error with the exception huggingface_hub raises for them.
"""

from __future__ import annotations

import socket
from types import SimpleNamespace

import pytest

from idp_pipelines.hub import HubError, download_model, local_snapshot, plan_download, resolve_revision
from idp_pipelines.hub.errors import map_error

REPO = "lab/tiny-model"
LAB = "/srv/lab/home.yaml"
FILES = {"config.json": b'{"hidden_size": 8}\n', "model.safetensors": b"w" * 5000}


def _error(fn) -> str:
    with pytest.raises(HubError) as err:
        fn()
    return str(err.value)


def test_repository_not_found(hub, cache_dir):
    msg = _error(lambda: download_model("lab/none", "main", cache_dir=cache_dir, endpoint=hub.url, lab_file=LAB))
    assert msg == (
        f"Repository 'lab/none' was not found at {hub.url} (HTTP 404 on {hub.url}/api/models/lab/none/revision/main) "
        "while resolving the revision of 'lab/none'. Check the model's `repo_id` in /srv/lab/home.yaml and the "
        "`hub.endpoint` field of /srv/lab/home.yaml; if the repo is private, set HF_TOKEN to a token that can read it."
    )


def test_revision_not_found(hub, cache_dir):
    hub.create_repo(REPO, FILES)
    msg = _error(lambda: download_model(REPO, "v9", cache_dir=cache_dir, endpoint=hub.url, lab_file=LAB))
    assert msg == (
        f"Revision 'v9' does not exist in '{REPO}' at {hub.url} (HTTP 404 on {hub.url}/api/models/{REPO}/revision/v9) "
        f"while resolving the revision of '{REPO}'. Check the model's `revision` in /srv/lab/home.yaml: a branch, "
        "a tag or a 40-hex commit sha of that repo."
    )


def test_gated_without_and_with_a_refused_token(hub, cache_dir):
    hub.create_repo(REPO, FILES, gated=True)
    msg = _error(lambda: download_model(REPO, "main", cache_dir=cache_dir, endpoint=hub.url, lab_file=LAB))
    assert msg == (
        f"Repository '{REPO}' at {hub.url} is gated and no token was sent (HTTP 401) while resolving the revision "
        f"of '{REPO}'. Accept the licence on {hub.url}/{REPO} and set HF_TOKEN to a read token of that account."
    )
    msg = _error(lambda: download_model(REPO, "main", cache_dir=cache_dir, endpoint=hub.url, lab_file=LAB,
                                        token="hf_refused_secret"))
    assert msg == (
        f"Repository '{REPO}' at {hub.url} is gated and refused the token sent (from HF_TOKEN or the caller; "
        f"HTTP 403) while resolving the revision of '{REPO}'. Accept the licence on {hub.url}/{REPO} with the "
        "account that owns the token, or set HF_TOKEN to a read token of an account that has accepted it."
    )


def test_file_listed_but_missing(hub, cache_dir):
    sha = hub.create_repo(REPO, FILES)
    hub.hide_file(REPO, "config.json")
    msg = _error(lambda: download_model(REPO, sha, cache_dir=cache_dir, endpoint=hub.url, lab_file=LAB))
    assert msg == (
        f"File 'config.json' does not exist in '{REPO}' at revision {sha} ({hub.url}, HTTP 404 on "
        f"{hub.url}/{REPO}/resolve/{sha}/config.json) while downloading file 'config.json' of '{REPO}'. "
        "Check the files / allow_patterns of this model in /srv/lab/home.yaml."
    )


def test_unreachable_endpoint(cache_dir):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{s.getsockname()[1]}"
    msg = _error(lambda: download_model(REPO, "main", cache_dir=cache_dir, endpoint=endpoint, lab_file=LAB))
    assert msg == (
        f"Could not reach the Hub at {endpoint} while resolving the revision of '{REPO}' at revision main "
        "(ConnectError: [Errno 111] Connection refused). Check the network, the `hub.endpoint` field of "
        "/srv/lab/home.yaml and HF_HUB_OFFLINE, then rerun: files already downloaded and verified stay in the cache."
    )


def test_http_error_on_a_file_says_the_hub_answered(hub, cache_dir):
    # huggingface_hub wraps it as "not found locally"; the Hub was reached and said no: the message says so.
    sha = hub.create_repo(REPO, FILES)
    hub.fail_status(REPO, "model.safetensors", 400)
    msg = _error(lambda: download_model(REPO, sha, cache_dir=cache_dir, endpoint=hub.url, lab_file=LAB))
    assert msg == (
        f"The Hub at {hub.url} answered HTTP 400 on {hub.url}/{REPO}/resolve/{sha}/model.safetensors while "
        f"downloading file 'model.safetensors' of '{REPO}' at revision {sha}. Rerun later; if it persists, "
        "check the Hub status page and the `hub.endpoint` field of /srv/lab/home.yaml."
    )


def test_http_error_on_the_api_and_a_truncated_file():
    import httpx2
    from huggingface_hub import errors as hf

    url = "https://hub.example/api/models/lab/tiny-model/revision/main"
    response = httpx2.Response(502, request=httpx2.Request("GET", url))
    mapped = map_error(hf.HfHubHTTPError("Bad Gateway", response=response), action="resolving the revision of",
                       repo_id=REPO, revision="main", endpoint="https://hub.example", token=None, lab_file=LAB)
    assert str(mapped) == (
        f"The Hub at https://hub.example answered HTTP 502 on {url} while resolving the revision of '{REPO}' at "
        "revision main. Rerun later; if it persists, check the Hub status page and the `hub.endpoint` field of "
        "/srv/lab/home.yaml."
    )
    short = OSError("Consistency check failed: file should be of size 5000 but has size 2500 (model.safetensors).")
    mapped = map_error(short, action="downloading", repo_id=REPO, revision="a" * 40, endpoint="https://hub.example",
                       token=None, lab_file=LAB)
    assert str(mapped) == (
        f"A download from https://hub.example ended with the wrong size while downloading '{REPO}' at revision "
        f"{'a' * 40} (Consistency check failed: file should be of size 5000 but has size 2500 (model.safetensors).). "
        "Rerun; if it persists, the connection or a proxy is truncating files."
    )
    assert map_error(ValueError("not ours"), action="downloading", repo_id=REPO, revision=None,
                     endpoint="https://hub.example", token=None) is None


def test_endpoint_that_is_not_a_hub_and_a_moved_commit(monkeypatch):
    from huggingface_hub import HfApi

    monkeypatch.setattr(HfApi, "model_info", lambda self, repo_id, revision=None: SimpleNamespace(sha=None))
    msg = _error(lambda: resolve_revision(REPO, "main", endpoint="https://hub.example", lab_file=LAB))
    assert msg == (
        f"https://hub.example returned no commit sha for '{REPO}' at revision 'main' (got ''). Check that the "
        "`hub.endpoint` field of /srv/lab/home.yaml points to a Hugging Face Hub."
    )
    monkeypatch.setattr(HfApi, "model_info", lambda self, repo_id, revision=None: SimpleNamespace(sha="b" * 40))
    msg = _error(lambda: resolve_revision(REPO, "a" * 40, endpoint="https://hub.example", lab_file=LAB))
    assert msg == (
        f"Asked for commit {'a' * 40} of '{REPO}' but https://hub.example answered with {'b' * 40}. "
        "Check the model's `revision` in /srv/lab/home.yaml."
    )


def test_plan_errors(hub):
    sha = hub.create_repo(REPO, FILES)
    assert _error(lambda: plan_download(REPO, "main", endpoint=hub.url)) == (
        f"plan_download needs a 40-hex commit sha for '{REPO}', got 'main': call resolve_revision first."
    )
    msg = _error(lambda: plan_download(REPO, sha, allow_patterns=["config.json", "model.gguf"], endpoint=hub.url,
                                       lab_file=LAB))
    assert msg == (
        f"In '{REPO}' at commit {sha}, file(s) 'model.gguf' do not exist. The repo has: config.json, "
        "model.safetensors. Fix the files / allow_patterns of this model in /srv/lab/home.yaml."
    )
    msg = _error(lambda: plan_download(REPO, sha, allow_patterns="*.gguf", ignore_patterns=["*.md"],
                                       endpoint=hub.url, lab_file=LAB))
    assert msg == (
        f"In '{REPO}' at commit {sha}, no file matches allow_patterns=['*.gguf'] and ignore_patterns=['*.md']. "
        "The repo has: config.json, model.safetensors. Fix the files / allow_patterns of this model in "
        "/srv/lab/home.yaml."
    )


def test_local_snapshot_errors(hub, cache_dir):
    assert _error(lambda: local_snapshot(cache_dir, REPO, "main")) == (
        f"'{REPO}' at 'main' is not in the model cache {cache_dir} yet. Fix: materialise its hub_model "
        "partition first."
    )
    sha = hub.create_repo(REPO, FILES)
    snapshot = cache_dir / "models--lab--tiny-model" / "snapshots" / sha
    assert _error(lambda: local_snapshot(cache_dir, REPO, sha)) == (
        f"The snapshot {snapshot} of '{REPO}'@{sha} is missing from the model cache. "
        "Fix: materialise its hub_model partition again."
    )
