"""The Hugging Face Hub: adapters loaded from a repo, and pushed to one with a model card.

    CSReftModel.from_pretrained(base, "org/name", revision="v1")   # only the adapter files
    model.push_to_hub("org/name")                                  # adapter + README.md card

Only the adapter's files travel (6.3 MB for SmolLM2 with the default configuration, most of it
the bases' d x d buffers), never the base model's weights. Loading honours the usual Hub
settings (HF_ENDPOINT, HF_HUB_CACHE, HF_HUB_OFFLINE, HF_TOKEN).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

from .integrity import ADAPTER_CONFIG, ADAPTER_WEIGHTS, LEGACY_CONFIG, LEGACY_WEIGHTS, adapter_files, read_adapter_config

ADAPTER_PATTERNS = [ADAPTER_CONFIG, ADAPTER_WEIGHTS, LEGACY_CONFIG, LEGACY_WEIGHTS]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_repo_id(name: str | os.PathLike) -> bool:
    """Whether `name` reads as a Hub repo id ("org/name") and is not an existing local path."""
    text = str(name)
    return not os.path.exists(text) and bool(_REPO_ID.match(text)) and ".." not in text


def resolve_adapter(name_or_path: str | os.PathLike, revision: str | None = None, token=None,
                    cache_dir=None) -> Path:
    """A local adapter directory: `name_or_path` itself when it is local, else the snapshot of
    the Hub repo it names, downloaded (adapter files only) or found in the cache."""
    if not is_repo_id(name_or_path):
        if revision is not None:
            raise ValueError(f"{name_or_path}: revision={revision!r} applies to Hub repos ('org/name'), "
                             "not to a local folder")
        return Path(name_or_path)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    where = f"{name_or_path}" + (f" (revision {revision!r})" if revision else "")
    try:
        local = Path(snapshot_download(str(name_or_path), revision=revision, allow_patterns=ADAPTER_PATTERNS,
                                       token=token, cache_dir=cache_dir))
    except RevisionNotFoundError as err:
        raise ValueError(f"{where}: no such revision on the Hub") from err
    except RepositoryNotFoundError as err:
        raise FileNotFoundError(f"{name_or_path}: no such local folder, and no such repo on the Hub "
                                "(or it is private: log in or pass token=)") from err
    except (LocalEntryNotFoundError, EntryNotFoundError) as err:
        cause = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise FileNotFoundError(f"{where}: not a local folder; on the Hub: {cause} (offline, or the "
                                "endpoint unreachable, and not in the Hub cache)") from err
    if not adapter_files(local)[0].is_file() or not adapter_files(local)[1].is_file():
        raise FileNotFoundError(f"{where}: the repo holds no csreft adapter ({ADAPTER_CONFIG} and "
                                f"{ADAPTER_WEIGHTS})")
    return local


def model_card(meta: dict, counts: dict, repo_id: str) -> str:
    """README.md for an adapter repo: base model, skills, configuration, parameter counts,
    training data and command when known, library name."""
    from .base_models import HUB_IDS

    base = (meta.get("base_model") or {}).get("name_or_path") or "unknown"
    hub_base = HUB_IDS.get(base, base)  # the embedded SmolLM2 is a copy of the Hub's
    info = meta.get("metadata") or {}
    skills = info.get("skills") or []
    training = info.get("training") or {}
    front = ["---", "library_name: csreft", "tags:", "- csreft", "- reft", "- representation-fine-tuning"]
    if base != "unknown" and not os.path.isabs(base):
        front.append(f"base_model: {hub_base}")
    lines = [*front, "---", "", f"# {repo_id}", "",
             f"A CS-ReFT adapter (routed low-rank edits of hidden states) for the frozen base model "
             f"`{hub_base}`. It holds only the edits and the router, not the base weights.", "",
             "```python", "import csreft", "",
             f'base, tokenizer = csreft.load_base("{base}")',
             f'model = csreft.CSReftModel.from_pretrained(base, "{repo_id}")', "```", "",
             "## Skills", "", (", ".join(f"`{s}`" for s in skills) if skills else
                               "Unsupervised: the subspaces have no skill names; the router chooses them."), "",
             "## Parameters", "", "| component | parameters |", "| --- | ---: |",
             f"| edits | {counts['edits']:,} |", f"| router | {counts['router']:,} |",
             f"| total | {counts['total']:,} ({counts['percent']:.4f}% of the base's {counts['base']:,}) |", ""]
    if training.get("data") or training.get("command"):
        lines += ["## Training", ""]
        if training.get("data"):
            lines.append(f"- data: `{training['data']}`")
        if info.get("step") is not None:
            lines.append(f"- steps: {info['step']}")
        if training.get("command"):
            lines.append(f"- command: `{training['command']}`")
        lines.append("")
    lines += ["## Configuration", "", "```json", json.dumps(meta.get("csreft_config", {}), indent=2, sort_keys=True),
              "```", ""]
    return "\n".join(lines)


def push_adapter(directory: str | os.PathLike, repo_id: str, counts: dict, private: bool | None = None,
                 token=None, revision: str | None = None, commit_message: str | None = None) -> str:
    """Upload a saved adapter folder plus a model card to `repo_id` (created if needed); returns
    the commit URL. The local folder is only read."""
    from huggingface_hub import HfApi

    meta = read_adapter_config(directory)
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory() as staging:
        config, weights = adapter_files(directory)
        for source, name in ((config, ADAPTER_CONFIG), (weights, ADAPTER_WEIGHTS)):
            (Path(staging) / name).write_bytes(source.read_bytes())
        (Path(staging) / "README.md").write_text(model_card(meta, counts, repo_id))
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=staging, revision=revision,
                                 commit_message=commit_message or "Upload CS-ReFT adapter")
    return str(getattr(info, "commit_url", info))


def push_model(model, repo_id: str, metadata: dict | None = None, **options) -> str:
    """Write `model`'s adapter into a temporary folder and push it (see push_adapter)."""
    with tempfile.TemporaryDirectory() as tmp:
        model.write_adapter(tmp, metadata)
        return push_adapter(tmp, repo_id, model.trainable_parameters(), **options)
