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
) -> HubError | None:
    """Translate a huggingface_hub or network error into a HubError; None when it is not one of ours."""
    import httpx2
    from huggingface_hub import errors as hf

    rev = revision or "main"
    url = _response_url(error) or _request_url(error)
    status = getattr(getattr(error, "response", None), "status_code", None)

    if isinstance(error, hf.GatedRepoError):
        if token:
            msg = (
                f"Repository '{repo_id}' at {endpoint} is gated and refused the token sent (from HF_TOKEN or "
                f"the caller; HTTP {status}) while {action}. Accept the licence on {endpoint}/{repo_id} with the "
                "account that owns the token, or set HF_TOKEN to a read token of an account that has accepted it."
            )
        else:
            msg = (
                f"Repository '{repo_id}' at {endpoint} is gated and no token was sent (HTTP {status}) while "
                f"{action}. Accept the licence on {endpoint}/{repo_id} and set HF_TOKEN to a read token of "
                "that account."
            )
    elif isinstance(error, hf.RepositoryNotFoundError):
        msg = (
            f"Repository '{repo_id}' was not found at {endpoint} (HTTP {status} on {url}) while {action}. "
            "Check repo_id in lab.yaml; if the repo is private, set HF_TOKEN to a token that can read it."
        )
    elif isinstance(error, hf.RevisionNotFoundError):
        msg = (
            f"Revision '{rev}' does not exist in '{repo_id}' at {endpoint} (HTTP {status} on {url}) while "
            f"{action}. Check revision in lab.yaml: a branch, a tag or a 40-hex commit sha of that repo."
        )
    elif isinstance(error, hf.RemoteEntryNotFoundError):
        name = filename or _file_from_url(url) or "?"
        msg = (
            f"File '{name}' does not exist in '{repo_id}' at revision {rev} ({endpoint}, HTTP {status} on "
            f"{url}) while {action}. Check the files / allow_patterns of this model in lab.yaml."
        )
    elif isinstance(error, (hf.LocalEntryNotFoundError, hf.OfflineModeIsEnabled, httpx2.TransportError)):
        cause = _root_cause(error)
        where = _request_url(cause) or url
        name = filename or _file_from_url(where)
        what = f" file '{name}' of" if name else ""
        msg = (
            f"Could not reach the Hub at {endpoint} while {action}{what} '{repo_id}' at revision {rev}"
            f" ({type(cause).__name__}: {cause}). Check the network, HF_ENDPOINT and HF_HUB_OFFLINE, then "
            "rerun: files already downloaded and verified stay in the cache."
        )
    elif isinstance(error, hf.HfHubHTTPError):
        msg = (
            f"The Hub at {endpoint} answered HTTP {status} on {url} while {action} '{repo_id}' at revision "
            f"{rev}. Rerun later; if it persists, check the Hub status page and HF_ENDPOINT."
        )
    elif isinstance(error, OSError) and "Consistency check failed" in str(error):
        msg = (
            f"A download from {endpoint} for '{repo_id}' at revision {rev} ended with the wrong size while "
            f"{action} ({error}). Rerun; if it persists, the connection or a proxy is truncating files."
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
        )
        if mapped is None:
            raise
        raise mapped from error
