"""Hugging Face Hub repo ids (`org/name`, `org/name@revision`) as diff or base arguments.

Resolution goes through huggingface_hub, so its cache layout, tokens and HF_HOME/HF_HUB_CACHE apply.
HF_HUB_OFFLINE and the cache location are read when a repo is resolved rather than when
huggingface_hub was imported, so they can be set by the caller at any time.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import FormatError

# Only the files a diff or a base needs: never a repo's TF/Flax/ONNX weights.
PATTERNS = [
    "*.json", "*.sft", "*.safetensors", "pytorch_diff.bin", "adapter_model.bin", "pytorch_model*.bin",
    "*.txt", "*.model",
]

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*(@[A-Za-z0-9._/-]+)?$")


_FILE_SUFFIXES = (".sft", ".bin", ".safetensors", ".npz", ".json", ".pt", ".pth")


def looks_like_repo_id(spec: str) -> bool:
    """`org/name` or `org/name@revision` that is not a local path: nothing of that name exists, its
    first part is not a local folder, and it does not end like a file name."""
    repo_id = spec.partition("@")[0]
    return (bool(_REPO_ID.match(spec)) and ".." not in spec and not os.path.exists(spec)
            and not os.path.isdir(repo_id.split("/")[0]) and not repo_id.endswith(_FILE_SUFFIXES))


def parse(spec: str) -> tuple[str, str | None]:
    """(repo id, revision or None)."""
    repo_id, _, revision = spec.partition("@")
    return repo_id, revision or None


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def cache_dir() -> Path:
    """huggingface_hub's cache folder as the environment names it now."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "huggingface")
    return Path(home).expanduser() / "hub"


def resolve(spec: str) -> Path:
    """The local snapshot folder of Hub repo `spec` (downloaded unless offline)."""
    repo_id, revision = parse(spec)
    from huggingface_hub import snapshot_download
    from huggingface_hub import errors as hf_errors

    is_offline = offline()
    try:
        folder = snapshot_download(repo_id, revision=revision, cache_dir=cache_dir(),
                                   local_files_only=is_offline, allow_patterns=PATTERNS)
    except (hf_errors.RepositoryNotFoundError, hf_errors.GatedRepoError):
        raise FormatError(
            f"{spec}: repository not found on the Hugging Face Hub (or it is private/gated: log in with "
            "`hf auth login` or set HF_TOKEN)"
        ) from None
    except hf_errors.RevisionNotFoundError:
        raise FormatError(f"{spec}: revision {revision!r} not found on the Hugging Face Hub") from None
    except (hf_errors.LocalEntryNotFoundError, hf_errors.OfflineModeIsEnabled, FileNotFoundError):
        if is_offline:
            raise FormatError(
                f"{spec}: not found in the local Hugging Face cache and the Hub is offline (HF_HUB_OFFLINE=1, "
                f"cache {cache_dir()}); download it first or unset HF_HUB_OFFLINE"
            ) from None
        raise FormatError(f"{spec}: not found in the local Hugging Face cache ({cache_dir()}) and the Hub "
                          "could not be reached; check the network or the repo id") from None
    except hf_errors.HFValidationError as e:
        raise FormatError(f"{spec}: not a valid Hub repo id ({e})") from None
    except (hf_errors.HfHubHTTPError, OSError) as e:
        raise FormatError(f"{spec}: could not be fetched from the Hugging Face Hub ({e.__class__.__name__})") from None
    return Path(folder)
