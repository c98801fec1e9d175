"""Hub datasets for `data.train` / `data.eval`: datasets' cache and offline mode, no retry storm.

`datasets.load_dataset("org/name")` with no network retries its first request with
backoff (five `Retrying in 8s` lines, about 25 s) and only then falls back to the
local cache, or fails with "Couldn't reach ... (LocalEntryNotFoundError)". As for
models (grass_cli/hub.py), one quick request without retries comes first here and
tells the cases apart: the hub has the dataset (datasets then loads it as usual,
from its cache when the commit is the cached one), no such dataset / revision, a
gated one, or no answer, in which case the datasets cache is read with offline
mode forced for that one call. With HF_DATASETS_OFFLINE / HF_HUB_OFFLINE set the
hub is never asked. Datasets that need their own Python code are refused
(`trust_remote_code` is never passed as true): nothing we load can run code.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from typing import Any

from grass_cli.data.reading import _quiet_datasets
from grass_cli.errors import DataError
from grass_cli.hub import HUB_TIMEOUT_S, _network_errors, first_line, hub_offline
from grass_cli.recipe.sources import DataSource

DATA_HINT = (
    "load it once where there is network (it then stays in the datasets cache, "
    "HF_DATASETS_CACHE), or save it with `Dataset.save_to_disk(DIR)` and set path to DIR"
)


def offline() -> bool:
    """Whether datasets (HF_DATASETS_OFFLINE) or the hub (HF_HUB_OFFLINE) is offline."""
    import datasets

    return bool(datasets.config.HF_HUB_OFFLINE) or hub_offline()


@contextlib.contextmanager
def _forced_offline() -> Iterator[None]:
    """datasets' offline mode for one call: it reads its cache and never the network.

    datasets reads `config.HF_HUB_OFFLINE` at each call (the environment only at
    import), so setting it is how one load can be cache-only.
    """
    import datasets

    saved = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE = saved


def _kwargs(spec: DataSource) -> dict[str, Any]:
    import datasets

    kwargs: dict[str, Any] = {
        "name": spec.config,
        "split": spec.split or "train",
        "revision": spec.revision,
    }
    if "trust_remote_code" in inspect.signature(datasets.load_dataset).parameters:
        kwargs["trust_remote_code"] = False  # datasets < 4 could run a loading script
    return kwargs


def _cache_miss(e: Exception, spec: DataSource, where: str, why: str) -> DataError:
    """Why the datasets cache could not give this dataset, in one line."""
    import datasets

    text = str(e)
    cache = datasets.config.HF_DATASETS_CACHE
    if "Couldn't find cache" in text:  # cached, but another config
        available = text.split("Available configs in the cache:", 1)
        found = f" (cached configs: {available[1].strip()})" if len(available) > 1 else ""
        return DataError(
            f"cannot load this hub dataset: {why}, and config {spec.config!r} is not in the "
            f"datasets cache ({cache}){found}",
            where=where,
            hint="set config to a cached one, or " + DATA_HINT,
        )
    if "configurations in the cache" in text:  # several cached, none chosen
        return DataError(
            f"cannot choose a config: {first_line(e)}",
            where=where,
            hint="set config to one of the cached ones",
        )
    if "Unknown split" in text:
        return DataError(
            f"cannot take split {spec.split or 'train'!r}: {first_line(e)}", where=where
        )
    return DataError(
        f"cannot load this hub dataset: {why}, and it is not in the datasets cache ({cache}); "
        "no local file or folder has that name either",
        where=where,
        hint=DATA_HINT
        + (", or unset HF_DATASETS_OFFLINE / HF_HUB_OFFLINE" if "offline" in why else ""),
    )


def from_cache(spec: DataSource, where: str, why: str) -> Any:
    """The dataset from the datasets cache alone (the latest cached copy of its
    config, as datasets' own offline mode gives it)."""
    import datasets

    with _quiet_datasets(), _forced_offline():
        try:
            return datasets.load_dataset(spec.path, **_kwargs(spec))
        except Exception as e:  # not cached, another config cached, unknown split
            raise _cache_miss(e, spec, where, why) from None


def hub_status(spec: DataSource, where: str) -> str | None:
    """One request, no retries: None when the hub has the dataset (at the revision),
    the reason when the hub did not answer; a DataError when it said no."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    url = hf_hub_url(
        spec.path,
        "README.md",
        repo_type="dataset",
        revision=spec.revision,
        endpoint=constants.ENDPOINT,
    )
    kwargs: dict[str, Any] = {"timeout": HUB_TIMEOUT_S}
    if "retry_on_errors" in inspect.signature(get_hf_file_metadata).parameters:
        kwargs["retry_on_errors"] = False
    try:
        get_hf_file_metadata(url, **kwargs)
    except GatedRepoError:
        raise DataError(
            "this hub dataset is gated: its terms must be accepted before it can be downloaded",
            where=where,
            hint=f"accept them on {constants.ENDPOINT}/datasets/{spec.path}, then `hf auth login`",
        ) from None
    except RepositoryNotFoundError:
        raise DataError(
            "no such dataset on the hub (or it is private and you are not logged in), "
            "and no such local file or folder",
            where=where,
            hint="check the spelling of ORG/NAME (`hf auth login` for a private dataset), "
            "or give the path of an existing file or folder",
        ) from None
    except RevisionNotFoundError:
        raise DataError(
            f"the hub dataset has no revision {spec.revision!r}",
            where=where,
            hint="use a branch, tag or commit of the dataset, or remove revision (main)",
        ) from None
    except EntryNotFoundError:
        return None  # the repository exists, without a README
    except HfHubHTTPError as e:
        raise DataError(
            f"the hub refused the request: {first_line(e)}", where=where, hint=DATA_HINT
        ) from None
    except _network_errors() as e:
        return f"the hub is unreachable ({first_line(e)})"
    return None


def load_hub(spec: DataSource, where: str) -> Any:
    """A hub dataset's split as a datasets.Dataset (memory-mapped from the cache)."""
    import datasets

    if offline():
        return from_cache(spec, where, "offline mode is set (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE)")
    why = hub_status(spec, where)
    if why is not None:
        return from_cache(spec, where, why)
    with _quiet_datasets():
        try:
            return datasets.load_dataset(spec.path, **_kwargs(spec))
        except Exception as e:
            raise DataError(
                f"cannot load this hub dataset: {first_line(e)}",
                where=where,
                hint="set config (a dataset with several needs one) and check split",
            ) from None


def cached_or_probe(spec: DataSource, where: str) -> Any | None:
    """For the pre-flight, which must not download: the cached dataset when there is
    one; else None once the hub has confirmed it exists (a DataError when not)."""
    why = "offline mode is set (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE)" if offline() else None
    if why is None:
        why = hub_status(spec, where)
        if why is None:
            with contextlib.suppress(DataError):
                return from_cache(spec, where, "not downloaded yet")
            return None
    return from_cache(spec, where, why)
