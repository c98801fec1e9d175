"""Hub ids for `model.path`: the local cache first, then one quick look at the hub.

huggingface_hub retries a failed request with backoff, so with no network a
plain `from_pretrained("org/name")` prints twenty `Retrying in 8s` lines over
about 50 s and then fails with an OSError that does not say why. Here a cached
model is loaded from its snapshot folder (no request at all), and a missing one
gets a single HEAD request without retries whose answer names the cause.
Imports huggingface_hub only inside functions: `grass --help` stays fast.
"""

from __future__ import annotations

import inspect
import os
import sys
from pathlib import Path
from typing import Any

from grass_cli.errors import ModelError
from grass_cli.recipe import EMBEDDED_SMOLLM2

# Seconds the one look at the hub may take (a HEAD request for config.json).
HUB_TIMEOUT_S = 10.0
UNREACHABLE = "cannot load this hub model: the hub is unreachable and it is not in the local cache"
HUB_HINT = (
    "download it where there is network (`hf download ORG/NAME --local-dir DIR`) "
    "and set model.path to that folder"
)


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (transformers' run to a page)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def hub_offline() -> bool:
    """Whether HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) says not to ask the hub."""
    from huggingface_hub import constants

    flags = (os.environ.get(v, "") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    on = any(f.strip().upper() in {"1", "ON", "YES", "TRUE"} for f in flags)
    return on or bool(getattr(constants, "HF_HUB_OFFLINE", False))


def check_hub_id(repo_id: str, where: str) -> None:
    """A name that is neither an existing path nor a valid hub id (a space, `..`) is
    a path typo: say so before the cache or the hub is asked about it."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise ModelError(
            "model not found: not a folder, a .gguf file, or a valid hub id",
            where=where,
            hint="give an existing folder, a .gguf file, a hub id like org/name, "
            f"or {EMBEDDED_SMOLLM2}",
        ) from None


def cached_hub_folder(repo_id: str) -> Path | None:
    """The local cache's snapshot folder of a hub model, or None when it is not there.

    Loading a cached hub id by name still sends requests (transformers looks for a
    PEFT adapter on the hub even with local_files_only), and without network each
    one is retried for tens of seconds; loading the snapshot folder sends none.
    """
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "config.json")
    return Path(found).parent if isinstance(found, str) else None


def _network_errors() -> tuple[type[BaseException], ...]:
    """What a failed connection raises: OSError (requests, HF offline mode) or the
    TransportError of the httpx flavour this huggingface_hub version uses."""
    errors: list[type[BaseException]] = [OSError]
    for name in ("httpx", "httpx2"):
        module = sys.modules.get(name)
        if module is not None and hasattr(module, "TransportError"):
            errors.append(module.TransportError)
    return tuple(errors)


def probe_hub(repo_id: str, where: str, cached_error: str | None = None) -> None:
    """One quick look at the hub for a model that is not in the local cache.

    Without it, transformers' download retries every request with backoff (about
    50 s of `Retrying in 8s` lines with no network) and then reports any failure as
    one OSError. A single HEAD for config.json, without retries, tells the cases
    apart: offline, no network, no such repository, a gated one, or a repository
    that is not a transformers model. Returns when the hub has the model.
    `cached_error`: why the local cache's copy did not load (it holds the
    config but not every file, as after an interrupted download).
    """
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url
    from huggingface_hub.utils import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
    )

    unreachable = UNREACHABLE
    if cached_error:
        unreachable = unreachable.replace("it is not in", "only part of it is in")
        unreachable += f" (the cached copy: {cached_error})"
    if hub_offline():
        raise ModelError(
            unreachable + " (HF_HUB_OFFLINE is set, so the hub was not asked)",
            where=where,
            hint=HUB_HINT + ", or unset HF_HUB_OFFLINE",
        )
    kwargs: dict[str, Any] = {"timeout": HUB_TIMEOUT_S}
    if "retry_on_errors" in inspect.signature(get_hf_file_metadata).parameters:
        kwargs["retry_on_errors"] = False  # older huggingface_hub never retries here
    try:
        get_hf_file_metadata(hf_hub_url(repo_id, "config.json"), **kwargs)
    except GatedRepoError:
        raise ModelError(
            "this hub model is gated: its terms must be accepted before it can be downloaded",
            where=where,
            hint=f"accept them on {constants.ENDPOINT}/{repo_id}, then `hf auth login`",
        ) from None
    except RepositoryNotFoundError:
        local = Path(repo_id).expanduser().absolute()
        raise ModelError(
            "no such model on the hub (or it is private and you are not logged in), "
            f"and no folder {local}",
            where=where,
            hint="check the spelling of ORG/NAME on huggingface.co (`hf auth login` for a "
            "private model), or give the path of an existing model folder",
        ) from None
    except EntryNotFoundError:
        raise ModelError(
            "the hub repository has no config.json, so it is not a transformers model",
            where=where,
            hint="check the id; for a repository of GGUF files, download the .gguf file "
            "and set model.path to it",
        ) from None
    except HfHubHTTPError as e:
        raise ModelError(
            f"the hub refused the request: {first_line(e)}",
            where=where,
            hint="try again later, or " + HUB_HINT,
        ) from None
    except _network_errors() as e:
        raise ModelError(f"{unreachable} ({first_line(e)})", where=where, hint=HUB_HINT) from None


def hub_source(repo_id: str, where: str) -> str:
    """What to hand `from_pretrained` for a hub id: its snapshot folder when it is in
    the local cache (no request at all), else the id once the hub has answered that
    it has it; a ModelError saying why otherwise."""
    check_hub_id(repo_id, where)
    folder = cached_hub_folder(repo_id)
    if folder is not None:
        return str(folder)
    probe_hub(repo_id, where)
    return repo_id
