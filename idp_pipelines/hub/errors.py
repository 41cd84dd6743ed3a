"""HubError and the mapping of huggingface_hub / transport errors to messages that say what to do."""

from __future__ import annotations

import contextlib
from typing import Iterator


class HubError(Exception):
    """A Hub operation failed; the message names the repo, revision, file or URL and the fix."""


def _scrub(text: str, token: str | None) -> str:
    return text.replace(token, "***") if token else text


def _file_from_url(url: str | None) -> str | None:
    if url and "/resolve/" in url:
        return url.split("/resolve/", 1)[1].split("/", 1)[-1]
    return None


def _response_url(error: BaseException) -> str | None:
    response = getattr(error, "response", None)
    try:
        return str(response.url) if response is not None else None
    except Exception:  # a response without a request raises on .url
        return None


def _request_url(error: BaseException) -> str | None:
    try:
        return str(error.request.url)  # type: ignore[attr-defined]
    except Exception:  # httpx raises RuntimeError when the request was never set
        return None


def _status_of(error: BaseException) -> int | None:
    return getattr(getattr(error, "response", None), "status_code", None)


def _root_cause(error: BaseException) -> BaseException:
    while error.__cause__ is not None:
        error = error.__cause__
    return error


def map_error(
    error: BaseException,
    *,
    action: str,
    repo_id: str,
    revision: str | None,
    endpoint: str,
    token: str | None,
    filename: str | None = None,
    lab_file: str = "lab.yaml",
) -> HubError | None:
    """Translate a huggingface_hub or network error into a HubError; None when it is not one of ours.

    `action` is a verb phrase that takes the repo as its object ("downloading", "listing the files of"):
    every message reads "... while <action> [file 'x' of] '<repo>' ...". `lab_file` is the inventory the
    fix points at: the endpoint is its `hub.endpoint` field, the repo and revision its model's fields.
    """
    import httpx2
    from huggingface_hub import errors as hf

    rev = revision or "main"
    url = _response_url(error) or _request_url(error)
    status = _status_of(error)
    endpoint_fix = f"the `hub.endpoint` field of {lab_file}"
    model_fix = f"the model's `repo_id` in {lab_file}"

    def doing(name: str | None = filename) -> str:
        return f"{action}{f' file {name!r} of' if name else ''} '{repo_id}'"

    if isinstance(error, hf.GatedRepoError):
        if token:
            msg = (
                f"Repository '{repo_id}' at {endpoint} is gated and refused the token sent (from HF_TOKEN or "
                f"the caller; HTTP {status}) while {doing()}. Accept the licence on {endpoint}/{repo_id} with "
                "the account that owns the token, or set HF_TOKEN to a read token of an account that has "
                "accepted it."
            )
        else:
            msg = (
                f"Repository '{repo_id}' at {endpoint} is gated and no token was sent (HTTP {status}) while "
                f"{doing()}. Accept the licence on {endpoint}/{repo_id} and set HF_TOKEN to a read token of "
                "that account."
            )
    elif isinstance(error, hf.RepositoryNotFoundError):
        msg = (
            f"Repository '{repo_id}' was not found at {endpoint} (HTTP {status} on {url}) while {doing()}. "
            f"Check {model_fix} and {endpoint_fix}; if the repo is private, set HF_TOKEN to a token that "
            "can read it."
        )
    elif isinstance(error, hf.RevisionNotFoundError):
        msg = (
            f"Revision '{rev}' does not exist in '{repo_id}' at {endpoint} (HTTP {status} on {url}) while "
            f"{doing()}. Check the model's `revision` in {lab_file}: a branch, a tag or a 40-hex commit sha "
            "of that repo."
        )
    elif isinstance(error, hf.RemoteEntryNotFoundError):
        name = filename or _file_from_url(url) or "?"
        msg = (
            f"File '{name}' does not exist in '{repo_id}' at revision {rev} ({endpoint}, HTTP {status} on "
            f"{url}) while {doing(name)}. Check the files / allow_patterns of this model in {lab_file}."
        )
    elif isinstance(error, hf.LocalEntryNotFoundError) and _status_of(_root_cause(error)) is not None:
        # huggingface_hub wraps a file's HTTP error answer in "cannot find it locally": the Hub was reached.
        cause = _root_cause(error)
        msg = (
            f"The Hub at {endpoint} answered HTTP {_status_of(cause)} on {_request_url(cause) or url} while "
            f"{doing(filename or _file_from_url(_request_url(cause)))} at revision {rev}. Rerun later; if it "
            f"persists, check the Hub status page and {endpoint_fix}."
        )
    elif isinstance(error, (hf.LocalEntryNotFoundError, hf.OfflineModeIsEnabled, httpx2.TransportError)):
        cause = _root_cause(error)
        where = _request_url(cause) or url
        msg = (
            f"Could not reach the Hub at {endpoint} while {doing(filename or _file_from_url(where))} at "
            f"revision {rev} ({type(cause).__name__}: {cause}). Check the network, {endpoint_fix} and "
            "HF_HUB_OFFLINE, then rerun: files already downloaded and verified stay in the cache."
        )
    elif isinstance(error, hf.HfHubHTTPError):
        msg = (
            f"The Hub at {endpoint} answered HTTP {status} on {url} while {doing()} at revision {rev}. "
            f"Rerun later; if it persists, check the Hub status page and {endpoint_fix}."
        )
    elif isinstance(error, OSError) and "Consistency check failed" in str(error):
        msg = (
            f"A download from {endpoint} ended with the wrong size while {doing()} at revision {rev} "
            f"({error}). Rerun; if it persists, the connection or a proxy is truncating files."
        )
    else:
        return None
    return HubError(_scrub(msg, token))


@contextlib.contextmanager
def hub_errors(
    *,
    action: str,
    repo_id: str,
    revision: str | None,
    endpoint: str,
    token: str | None,
    filename: str | None = None,
    lab_file: str = "lab.yaml",
) -> Iterator[None]:
    """Re-raise huggingface_hub and network errors inside the block as HubError."""
    try:
        yield
    except HubError:
        raise
    except Exception as error:
        mapped = map_error(
            error,
            action=action,
            repo_id=repo_id,
            revision=revision,
            endpoint=endpoint,
            token=token,
            filename=filename,
            lab_file=lab_file,
        )
        if mapped is None:
            raise
        raise mapped from error
