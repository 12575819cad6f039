"""Where a model argument points, checked in the front end before any worker starts.

A model is a built-in preset name, a local diffusers folder, or a hub id (``owner/name``).
Each way it can be wrong gets one line that says what was tried and what to do, so the
command line can print it and exit 1 instead of a worker's traceback.
"""

from __future__ import annotations

import logging
import os


class ModelLoadError(RuntimeError):
    """The model cannot be loaded; the message is one line saying what was tried and what to do."""


def _presets() -> str:
    from engine.models.presets import PRESETS

    return ", ".join(sorted(PRESETS))


def check_model_source(model: str) -> str:
    """Return 'preset', 'folder' or 'hub' for a model that can be loaded; raise ModelLoadError otherwise.

    A hub id is fetched (into the local cache) here, so the workers load it from disk.
    """
    from engine.models.presets import PRESETS

    if model in PRESETS:
        return "preset"
    path = os.path.expanduser(model)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "model_index.json")):
            raise ModelLoadError(
                f"folder {model!r} is not a diffusers pipeline (it has no model_index.json); "
                f"pass a folder written by save_pretrained, a hub id, or a preset ({_presets()})")
        return "folder"
    if model.startswith((".", "/", "~")) or model.count("/") > 1 or os.path.exists(path):
        raise ModelLoadError(
            f"model folder {model!r} does not exist; pass an existing diffusers folder, a hub id "
            f"(owner/name), or a preset ({_presets()})")
    if model.count("/") != 1:
        raise ModelLoadError(
            f"unknown model {model!r}: not a preset, a folder or a hub id (owner/name); "
            f"presets: {_presets()}")
    _fetch_from_hub(model)
    return "hub"


def _fetch_from_hub(repo_id: str) -> None:
    from diffusers import DiffusionPipeline

    # diffusers logs each failed attempt ("Couldn't connect to the Hub ..."); the one line
    # below says it all.
    quiet = logging.getLogger("diffusers")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        DiffusionPipeline.download(repo_id)
    except Exception as exc:  # noqa: BLE001 - any failure to fetch is reported as one line
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise ModelLoadError(
            f"could not fetch {repo_id!r} from the Hugging Face hub ({type(exc).__name__}: {reason}); "
            f"check the id and the network (or HF_ENDPOINT / HF_HUB_OFFLINE with a filled cache), "
            f"or pass a local folder or a preset ({_presets()})") from None
    finally:
        quiet.setLevel(level)
