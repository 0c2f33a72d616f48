"""Hugging Face repositories through ``huggingface_hub``: its cache, ``HF_ENDPOINT``, ``HF_HUB_OFFLINE``, tokens.

A repository is either a transformers ViT (``config.json`` with ``model_type``, weights in
``model.safetensors`` or ``pytorch_model.bin``) or a timm model (``config.json`` with
``architecture``). Files carried by hand enter ``$VITLAB_HOME/hub/hf/ORG/REPO/REVISION/``
(``vitlab hub import FOLDER --name ...``) and are used before the network is asked.
"""
from __future__ import annotations

import json
from pathlib import Path

from .cache import OfflineError, cache_path, import_into, offline, sha256_file, verify_cached

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
OPTIONAL_FILES = ("preprocessor_config.json",)


def _download(repo: str, filename: str, revision: str, *, required: bool = True) -> Path | None:
    """One file through ``hf_hub_download``; None if it is optional and absent."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(hf_hub_download(repo, filename, revision=revision, library_name="vitlab",
                                    local_files_only=offline()))
    except LocalEntryNotFoundError:
        if not required:  # absent from the cache (offline) or the Hub unreachable: the caller decides
            return None
        if offline():
            raise OfflineError(f"hf-hub:{repo} ({filename}) is not in the Hugging Face cache and offline mode is on; "
                               f"run `vitlab hub download hf-hub:{repo}` on a connected machine and copy its "
                               f"files, or `vitlab hub import FOLDER --name hf-hub:{repo}`") from None
        raise ValueError(f"cannot reach the Hugging Face Hub for {repo}/{filename}; check the network or "
                         f"HF_ENDPOINT, or set HF_HUB_OFFLINE=1 to use the cache") from None
    except EntryNotFoundError:
        if required:
            raise ValueError(f"Hugging Face repository {repo} has no {filename} at revision {revision}") from None
        return None
    except RepositoryNotFoundError as err:
        raise ValueError(f"no Hugging Face repository {repo} (or it is private: set HF_TOKEN); {err}") from None
    except OSError as err:  # network errors surface as requests/httpx OSErrors
        raise ValueError(f"download of {repo}/{filename} failed ({err}); run the command again") from None


def imported_dir(repo: str, revision: str) -> Path:
    """Where a hand-carried copy of a repository lives in vitlab's cache."""
    return cache_path("hf", f"{repo}/{revision}")


def fetch_repo(repo: str, revision: str = "main", files: list[str] | None = None, *,
               sha256: str | None = None) -> Path:
    """A local folder holding the repository's config and weights (downloaded or imported)."""
    local = imported_dir(repo, revision)
    if (local / "config.json").is_file():
        for name in ("config.json", *OPTIONAL_FILES, *WEIGHT_FILES):
            if (local / name).is_file():
                verify_cached(local / name, sha256 if name in WEIGHT_FILES else None)
        return local
    names = [n for n in files or [] if n not in WEIGHT_FILES]
    if not names:
        config = _download(repo, "config.json", revision)
        timm = "architecture" in json.loads(config.read_text())
        names = ["config.json"] if timm else ["config.json", *OPTIONAL_FILES]
    paths = [p for n in names if (p := _download(repo, n, revision, required=n not in OPTIONAL_FILES)) is not None]
    preferred = [w for w in files or [] if w in WEIGHT_FILES] + [w for w in WEIGHT_FILES if w not in (files or [])]
    weights = next((p for n in preferred if (p := _download(repo, n, revision, required=False))), None)
    if weights is None and offline():
        raise OfflineError(f"hf-hub:{repo} has no weights in the Hugging Face cache and offline mode is on; "
                           f"download them on a connected machine, or `vitlab hub import FOLDER --name ...`")
    if weights is None:
        raise ValueError(f"Hugging Face repository {repo} has none of {', '.join(WEIGHT_FILES)} (or the Hub "
                         f"could not be reached: check the network or HF_ENDPOINT)")
    paths.append(weights)
    folder = paths[0].parent
    if sha256:
        if (actual := sha256_file(weights)) != sha256:
            raise ValueError(f"{weights} fails its check: sha256 {actual} is not the catalog's {sha256}; delete it "
                             f"from the Hugging Face cache (`hf cache delete`) and download again")
    return folder


def import_repo(src: Path, repo: str, revision: str, *, sha256: str | None = None) -> Path:
    """Copy a hand-carried repository folder (config.json + weights) into vitlab's cache."""
    if not (src / "config.json").is_file() or not any((src / w).is_file() for w in WEIGHT_FILES):
        raise ValueError(f"{src} is not a Hugging Face model folder: it needs config.json and one of "
                         f"{', '.join(WEIGHT_FILES)}")
    dest = imported_dir(repo, revision)
    for name in ("config.json", *OPTIONAL_FILES, *WEIGHT_FILES):
        if (src / name).is_file():
            import_into(src / name, dest / name, sha256=sha256 if name in WEIGHT_FILES else None)
    return dest
