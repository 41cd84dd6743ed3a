"""download_model & co. against the local Hub server, through huggingface_hub itself."""

from __future__ import annotations

import hashlib
import os
import random
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest

from idp_pipelines.files import hash_file
from idp_pipelines.hub import HubError, check_space, download_model, plan_download, resolve_revision
from idp_pipelines.hub import download as download_mod

from idp_pipelines.embedded.hubserver import DEFAULT_TOKEN as TOKEN

REPO = "lab/tiny-model"


def blob(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


FILES = {
    "config.json": b'{"architectures": ["TinyForCausalLM"], "hidden_size": 8}\n',
    "model.safetensors": blob(300_000, 1),
    "tokenizer/vocab.txt": b"<s>\n</s>\nhello\nworld\n",
}


def cache_state(cache_dir: Path) -> dict[str, tuple[int, int]]:
    """Every path under the cache with (size, mtime_ns), symlinks included, for before/after comparisons."""
    if not cache_dir.exists():
        return {}
    return {
        str(p.relative_to(cache_dir)): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in cache_dir.rglob("*")
    }


def read_snapshot(result) -> dict[str, bytes]:
    return {f.path: f.local_path.read_bytes() for f in result.files}


# -- happy paths -------------------------------------------------------------------------------------


def test_download_pinned_by_sha(hub, cache_dir):
    sha = hub.create_repo(REPO, FILES)

    result = download_model(REPO, sha, cache_dir=cache_dir, endpoint=hub.url)

    assert result.sha == sha
    assert result.snapshot_path == cache_dir / "models--lab--tiny-model" / "snapshots" / sha
    assert read_snapshot(result) == FILES
    by_path = {f.path: f for f in result.files}
    assert by_path["model.safetensors"].algo == "sha256"
    assert by_path["model.safetensors"].hash == hashlib.sha256(FILES["model.safetensors"]).hexdigest()
    assert by_path["config.json"].algo == "git-sha1"
    assert all(f.verified and f.hashed_now and not f.redownloaded for f in result.files)
    assert result.bytes_downloaded == sum(map(len, FILES.values()))
    assert result.mb_per_s > 0
    # Pinned by sha: no branch ref is invented.
    assert not (cache_dir / "models--lab--tiny-model" / "refs" / "main").exists()


def test_download_by_branch_records_sha_and_follows_a_moved_branch(hub, cache_dir):
    first = hub.create_repo(REPO, FILES)

    result = download_model(REPO, "main", cache_dir=cache_dir, endpoint=hub.url)
    assert result.sha == first and result.revision == "main"
    assert (cache_dir / "models--lab--tiny-model" / "refs" / "main").read_text() == first

    # A push moves the branch: the sensor's view (resolve_revision) and the next download follow it.
    new_config = b'{"architectures": ["TinyForCausalLM"], "hidden_size": 16}\n'
    second = hub.commit(REPO, {"config.json": new_config})
    assert second != first
    assert resolve_revision(REPO, "main", endpoint=hub.url) == second
    assert resolve_revision(REPO, first, endpoint=hub.url) == first

    hub.reset_counts()
    again = download_model(REPO, "main", cache_dir=cache_dir, endpoint=hub.url)
    assert again.sha == second
    assert read_snapshot(again) == {**FILES, "config.json": new_config}
    assert (cache_dir / "models--lab--tiny-model" / "refs" / "main").read_text() == second
    # Only the changed file travelled; the unchanged blobs were reused from the cache.
    assert hub.content_gets(REPO) == 1
    assert again.bytes_downloaded == len(new_config)


def test_rerun_with_nothing_new_downloads_and_hashes_nothing(hub, cache_dir):
    sha = hub.create_repo(REPO, FILES)
    download_model(REPO, "main", cache_dir=cache_dir, endpoint=hub.url)
    record = cache_dir / ".locks" / "idp-verified.json"
    assert record.is_file()

    hub.reset_counts()
    rerun = download_model(REPO, "main", cache_dir=cache_dir, endpoint=hub.url)

    assert rerun.sha == sha
    assert hub.content_gets() == 0
    assert hub.count("HEAD") == 0
    assert rerun.bytes_downloaded == 0
    assert rerun.files_hashed == 0
    assert read_snapshot(rerun) == FILES
    # The record sits where huggingface_hub's cache scanner does not mistake it for a broken repo.
    from huggingface_hub import scan_cache_dir

    assert scan_cache_dir(cache_dir).warnings == []

    # A blob rewritten behind our back (new mtime) is hashed again, and only that one.
    weights = next(f for f in rerun.files if f.path == "model.safetensors").local_path.resolve()
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 1_000_000_000))
    third = download_model(REPO, "main", cache_dir=cache_dir, endpoint=hub.url)
    assert [f.path for f in third.files if f.hashed_now] == ["model.safetensors"]
    assert hub.content_gets() == 0


def test_plan_download_sizes_hashes_and_patterns(cache_dir):
    from idp_pipelines.embedded.hubserver import HubServer

    # A page size of 2 makes huggingface_hub follow the Link header, as with big repos on the Hub.
    with HubServer(tree_page_size=2) as hub:
        sha = hub.create_repo(REPO, {**FILES, "README.md": b"# tiny\n", "extra/notes.txt": b"n"})
        plan = plan_download(REPO, sha, ignore_patterns=["*.md", "extra/*"], endpoint=hub.url)
        assert hub.count("GET", contains="/tree/") >= 3

    assert [f.path for f in plan.files] == sorted(FILES)
    assert plan.total_bytes == sum(map(len, FILES.values()))
    weights = next(f for f in plan.files if f.path == "model.safetensors")
    assert weights.lfs and weights.hash == hashlib.sha256(FILES["model.safetensors"]).hexdigest()
    vocab = next(f for f in plan.files if f.path == "tokenizer/vocab.txt")
    data = FILES["tokenizer/vocab.txt"]
    assert not vocab.lfs and vocab.hash == hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
    assert plan.missing_bytes(cache_dir) == plan.total_bytes


def test_progress_is_reported(hub, cache_dir):
    hub.create_repo(REPO, FILES)
    calls: list[tuple[int, int, str]] = []
    download_model(REPO, "main", cache_dir=cache_dir, endpoint=hub.url, progress=lambda *a: calls.append(a))
    total = sum(map(len, FILES.values()))
    assert (total, total) in {(d, t) for d, t, m in calls if m.startswith("downloading")}
    assert any(m.startswith("verified") for _, _, m in calls)


# -- network faults and corruption ------------------------------------------------------------------


def test_connection_dropped_once_mid_file_is_resumed(hub, cache_dir):
    sha = hub.create_repo(REPO, FILES)
    hub.drop_connection(REPO, "model.safetensors", times=1)

    result = download_model(REPO, sha, cache_dir=cache_dir, endpoint=hub.url)

    assert read_snapshot(result) == FILES
    assert hub.content_gets(REPO) == 4
    assert hub.count("GET", contains="/model.safetensors") == 2  # the cut transfer, then the retry


def test_connection_always_dropped_names_file_and_endpoint(hub, cache_dir, no_resume_waits):
    # The 5 resume attempts matter here, not the 1 s waits between them (see no_resume_waits).
    sha = hub.create_repo(REPO, FILES)
    hub.drop_connection(REPO, "model.safetensors", times=None)

    with pytest.raises(HubError) as err:
        download_model(REPO, sha, cache_dir=cache_dir, endpoint=hub.url)

    msg = str(err.value)
    assert f"Could not reach the Hub at {hub.url}" in msg
    assert "model.safetensors" in msg and REPO in msg
    assert "rerun" in msg
    assert hub.count("GET", contains="/model.safetensors") == 6  # first try + 5 resumes


@pytest.mark.parametrize(("path", "algo"), [("model.safetensors", "sha256"), ("config.json", "git-sha1")])
def test_corrupted_byte_once_is_fixed_by_a_fresh_download(hub, cache_dir, path, algo):
    sha = hub.create_repo(REPO, FILES)
    hub.corrupt(REPO, path, times=1)

    result = download_model(REPO, sha, cache_dir=cache_dir, endpoint=hub.url)

    assert read_snapshot(result) == FILES
    fixed = next(f for f in result.files if f.path == path)
    assert fixed.redownloaded and fixed.algo == algo
    assert [f.path for f in result.files if f.redownloaded] == [path]
    assert hub.count("GET", contains=f"/{path}") == 2


def test_corrupted_byte_every_time_raises_and_keeps_no_bad_copy(hub, cache_dir):
    sha = hub.create_repo(REPO, FILES)
    hub.corrupt(REPO, "model.safetensors", times=None)
    bad = bytearray(FILES["model.safetensors"])
    bad[len(bad) // 2] ^= 0xFF
    expected = hashlib.sha256(FILES["model.safetensors"]).hexdigest()
    got = hashlib.sha256(bad).hexdigest()

    with pytest.raises(HubError) as err:
        download_model(REPO, sha, cache_dir=cache_dir, endpoint=hub.url)

    assert str(err.value) == (
        f"Hash check failed for 1 file(s) of '{REPO}' at commit {sha} from {hub.url}: 'model.safetensors': "
        f"expected sha256 {expected}, got {got} and then {got} after a fresh download. The bad copies were "
        "removed from the cache. Rerun; if it persists, the Hub copy or a proxy on the way is corrupt: report "
        "it to the repo owner."
    )
    snapshot = cache_dir / "models--lab--tiny-model" / "snapshots" / sha
    assert not (snapshot / "model.safetensors").exists()
    assert not (cache_dir / "models--lab--tiny-model" / "blobs" / expected).exists()
    # The good files were verified and stay usable.
    assert (snapshot / "config.json").read_bytes() == FILES["config.json"]

    # Once the Hub serves good bytes again, the next run completes and fetches only the missing file.
    hub.clear_faults()
    hub.reset_counts()
    result = download_model(REPO, sha, cache_dir=cache_dir, endpoint=hub.url)
    assert read_snapshot(result) == FILES
    assert hub.content_gets() == 1
    assert result.files_hashed == 1


# -- bad input --------------------------------------------------------------------------------------


def test_repo_not_found(hub, cache_dir):
    with pytest.raises(HubError) as err:
        download_model("lab/no-such-model", "main", cache_dir=cache_dir, endpoint=hub.url)
    # Without the inventory's path (a direct call), the fix names lab.yaml's fields all the same.
    assert str(err.value) == (
        f"Repository 'lab/no-such-model' was not found at {hub.url} (HTTP 404 on "
        f"{hub.url}/api/models/lab/no-such-model/revision/main) while resolving the revision of "
        "'lab/no-such-model'. Check the model's `repo_id` in lab.yaml and the `hub.endpoint` field of lab.yaml; "
        "if the repo is private, set HF_TOKEN to a token that can read it."
    )
    assert cache_state(cache_dir) == {}


def test_revision_not_found(hub, cache_dir):
    hub.create_repo(REPO, FILES)
    with pytest.raises(HubError) as err:
        download_model(REPO, "v9-does-not-exist", cache_dir=cache_dir, endpoint=hub.url)
    msg = str(err.value)
    assert f"Revision 'v9-does-not-exist' does not exist in '{REPO}' at {hub.url}" in msg
    assert "Check the model's `revision` in lab.yaml" in msg
    with pytest.raises(HubError, match="Revision '0{40}' does not exist"):
        resolve_revision(REPO, "0" * 40, endpoint=hub.url)


def test_allow_pattern_naming_a_missing_file_is_an_error(hub, cache_dir):
    sha = hub.create_repo(REPO, FILES)
    hub.reset_counts()

    with pytest.raises(HubError) as err:
        download_model(REPO, sha, cache_dir=cache_dir, endpoint=hub.url, allow_patterns=["config.json", "model.gguf"])
    msg = str(err.value)
    assert f"In '{REPO}' at commit {sha}, file(s) 'model.gguf' do not exist." in msg
    assert "The repo has: config.json, model.safetensors, tokenizer/vocab.txt." in msg
    assert "allow_patterns of this model in lab.yaml" in msg

    with pytest.raises(HubError, match=r"no file matches allow_patterns=\['\*\.gguf'\]"):
        download_model(REPO, sha, cache_dir=cache_dir, endpoint=hub.url, allow_patterns="*.gguf")
    assert hub.count("HEAD") == 0 and hub.content_gets() == 0
    assert cache_state(cache_dir) == {}


def test_file_listed_but_missing_on_the_hub(hub, cache_dir):
    sha = hub.create_repo(REPO, FILES)
    hub.hide_file(REPO, "config.json")
    with pytest.raises(HubError) as err:
        download_model(REPO, sha, cache_dir=cache_dir, endpoint=hub.url)
    msg = str(err.value)
    assert f"File 'config.json' does not exist in '{REPO}' at revision {sha} ({hub.url}, HTTP 404" in msg
    assert "Check the files / allow_patterns" in msg


def test_gated_repo_needs_hf_token(hub, cache_dir, monkeypatch):
    sha = hub.create_repo(REPO, FILES, gated=True)

    with pytest.raises(HubError) as err:
        download_model(REPO, "main", cache_dir=cache_dir, endpoint=hub.url)
    msg = str(err.value)
    assert f"Repository '{REPO}' at {hub.url} is gated and no token was sent (HTTP 401)" in msg
    assert f"Accept the licence on {hub.url}/{REPO} and set HF_TOKEN" in msg

    with pytest.raises(HubError) as err:
        download_model(REPO, "main", cache_dir=cache_dir, endpoint=hub.url, token="hf_not_accepted_secret")
    msg = str(err.value)
    assert "is gated and refused the token sent (from HF_TOKEN or the caller; HTTP 403)" in msg
    assert "set HF_TOKEN to a read token of an account that has accepted it" in msg
    assert "hf_not_accepted_secret" not in msg

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    result = download_model(REPO, "main", cache_dir=cache_dir, endpoint=hub.url)
    assert result.sha == sha and read_snapshot(result) == FILES
    assert TOKEN not in repr(result)


def test_unreachable_endpoint_is_named(cache_dir):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    with pytest.raises(HubError) as err:
        download_model(REPO, "main", cache_dir=cache_dir, endpoint=endpoint)
    msg = str(err.value)
    assert msg.startswith(f"Could not reach the Hub at {endpoint} while resolving the revision of '{REPO}'")
    # The endpoint comes from lab.yaml, not from huggingface_hub's HF_ENDPOINT: the fix names the field.
    assert "ConnectError" in msg and "the `hub.endpoint` field of lab.yaml" in msg and "HF_ENDPOINT" not in msg


# -- disk space -------------------------------------------------------------------------------------


def test_budget_exceeded_leaves_the_cache_as_it_was(hub, cache_dir):
    hub.create_repo(REPO, FILES)
    download_model(REPO, "main", cache_dir=cache_dir, endpoint=hub.url)
    big = "lab/big-model"
    hub.create_repo(big, {"model.gguf": blob(2_000_000, 2)})
    before = cache_state(cache_dir)
    used = download_mod.cache_size(cache_dir)
    hub.reset_counts()

    with pytest.raises(HubError) as err:
        download_model(big, "main", cache_dir=cache_dir, endpoint=hub.url, budget_bytes=used + 1_000_000)

    sha = resolve_revision(big, "main", endpoint=hub.url)
    assert str(err.value) == (
        f"The model cache budget does not fit '{big}' at {sha[:12]}: needs 0.00 GB (2000000 bytes), 0.00 GB "
        f"(1000000 bytes) available (0.00 GB ({used} bytes) of 0.00 GB ({used + 1_000_000} bytes) used in "
        f"{cache_dir}). Delete unused models (`hf cache rm`), raise `model_cache.budget_gb` in lab.yaml, or "
        "narrow allow_patterns."
    )
    assert cache_state(cache_dir) == before
    assert hub.content_gets() == 0

    # Files already in the cache do not count against the budget on a rerun.
    plan = plan_download(REPO, resolve_revision(REPO, "main", endpoint=hub.url), endpoint=hub.url)
    check_space(plan, cache_dir, budget_bytes=used)


def test_not_enough_free_disk(hub, cache_dir, monkeypatch):
    hub.create_repo(REPO, FILES)
    total, free = 10**12, 1000
    usage = SimpleNamespace(total=total, used=total - free, free=free)
    monkeypatch.setattr(download_mod.shutil, "disk_usage", lambda p: usage)
    with pytest.raises(HubError) as err:
        download_model(REPO, "main", cache_dir=cache_dir, endpoint=hub.url)
    total_bytes = sum(map(len, FILES.values()))
    sha = resolve_revision(REPO, "main", endpoint=hub.url)
    assert str(err.value) == (
        f"Not enough disk space for '{REPO}' at {sha[:12]}: needs 0.00 GB ({total_bytes} bytes), 0.00 GB "
        f"(1000 bytes) free on {cache_dir.parent}. Free some space, move `model_cache.path` in lab.yaml to a "
        "bigger disk, or narrow allow_patterns."
    )
    assert cache_state(cache_dir) == {}


def test_hash_file_matches_git_and_sha256(tmp_path):
    data = blob(3 * 1024 * 1024 + 17, 3)  # spans several 1 MiB chunks
    p = tmp_path / "f.bin"
    p.write_bytes(data)
    assert hash_file(p, "sha256") == hashlib.sha256(data).hexdigest()
    assert hash_file(p, "git-sha1") == hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def test_local_hub_speaks_the_resolve_protocol(hub):
    """The server contract huggingface_hub relies on: metadata headers, ranges, error codes."""
    import httpx

    sha = hub.create_repo(REPO, FILES)
    weights = FILES["model.safetensors"]
    base = f"{hub.url}/{REPO}/resolve/main"
    with httpx.Client() as client:
        head = client.head(f"{base}/model.safetensors")
        assert head.status_code == 200
        assert head.headers["X-Repo-Commit"] == sha
        assert head.headers["X-Linked-Etag"] == f'"{hashlib.sha256(weights).hexdigest()}"'
        assert head.headers["X-Linked-Size"] == head.headers["Content-Length"] == str(len(weights))

        part = client.get(f"{base}/model.safetensors", headers={"Range": "bytes=1000-"})
        assert part.status_code == 206
        assert part.headers["Content-Range"] == f"bytes 1000-{len(weights) - 1}/{len(weights)}"
        assert part.content == weights[1000:]

        missing = client.head(f"{base}/nope.bin")
        assert (missing.status_code, missing.headers["X-Error-Code"]) == (404, "EntryNotFound")
        assert client.get(f"{hub.url}/api/models/lab/other").headers["X-Error-Code"] == "RepoNotFound"
        assert client.get(f"{hub.url}/api/models/{REPO}/revision/v0").headers["X-Error-Code"] == "RevisionNotFound"


# -- repairs are loud, progress stays within its total -----------------------------------------------


def _flip_byte(path: Path) -> bytes:
    """Rot one byte of a cached blob in place (same size; the new mtime is what a real edit leaves too)."""
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x55
    path.write_bytes(bytes(data))
    return bytes(data)


def test_corrupt_file_in_the_cache_is_a_warning_with_both_hashes(hub, cache_dir):
    sha = hub.create_repo(REPO, FILES)
    first = download_model(REPO, sha, cache_dir=cache_dir, endpoint=hub.url)
    blob = next(f for f in first.files if f.path == "model.safetensors").local_path.resolve()
    bad = _flip_byte(blob)
    expected = hashlib.sha256(FILES["model.safetensors"]).hexdigest()
    got = hashlib.sha256(bad).hexdigest()

    warnings: list[str] = []
    calls: list[tuple[int, int, str]] = []
    hub.reset_counts()
    result = download_model(REPO, sha, cache_dir=cache_dir, endpoint=hub.url, warn=warnings.append,
                            progress=lambda *a: calls.append(a))

    assert warnings == [
        f"hash mismatch: 'model.safetensors' of '{REPO}'@{sha[:12]} in the model cache ({blob}): expected "
        f"sha256 {expected}, got {got}; removing that copy and downloading it again"
    ]
    (repaired,) = result.repaired_files
    assert (repaired.path, repaired.bad_copy, repaired.bad_hash) == ("model.safetensors", "cache", got)
    assert read_snapshot(result) == FILES and hub.content_gets() == 1
    messages = [m for _, _, m in calls]
    assert "hash mismatch in model.safetensors" in messages and "verified model.safetensors" not in messages
    # Nothing was missing when the run started: the repair's bytes make the total, and progress ends at 100 %.
    fetched = [(d, t) for d, t, m in calls if m.startswith("downloading")]
    size = len(FILES["model.safetensors"])
    assert fetched and all(d <= t for d, t in fetched) and fetched[-1] == (size, size)


def test_progress_never_passes_the_total_when_a_download_is_fetched_again(hub, cache_dir):
    sha = hub.create_repo(REPO, FILES)
    hub.corrupt(REPO, "model.safetensors", times=1)
    warnings: list[str] = []
    calls: list[tuple[int, int, str]] = []

    result = download_model(REPO, sha, cache_dir=cache_dir, endpoint=hub.url, warn=warnings.append,
                            progress=lambda *a: calls.append(a))

    total = sum(map(len, FILES.values()))
    fetched = [(d, t) for d, t, m in calls if m.startswith("downloading")]
    assert all(d <= t == total for d, t in fetched), fetched  # the retry reset its share: no "200 %"
    assert fetched[-1] == (total, total)
    assert result.bytes_downloaded == total + len(FILES["model.safetensors"])  # the wire saw the file twice
    (warning,) = warnings
    assert warning.startswith(f"hash mismatch: 'model.safetensors' of '{REPO}'@{sha[:12]} as just downloaded "
                              f"from {hub.url}: expected sha256 ")
    assert [(f.path, f.bad_copy) for f in result.repaired_files] == [("model.safetensors", "download")]
