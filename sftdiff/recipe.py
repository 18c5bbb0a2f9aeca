"""What a baked checkpoint is: the recipe `bake` records, the model card it writes, and reading both back.

`sftdiff apply` writes an ordinary transformers checkpoint; without a record nobody could tell which
base and which diffs made it. So every shard's safetensors metadata holds the recipe as JSON under
`RECIPE_KEY` (beside transformers' `"format": "pt"`), and the folder gets a README.md model card
with Hub front matter, the diffs with their content fingerprints and scales, and the command that
reproduces it; a base's own card is kept below. `sftdiff inspect FOLDER` reads the recipe back.
spec/format.md, appendix B, is the normative description of the recipe.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import sys
import threading
from pathlib import Path
from typing import Any, Sequence

from .errors import FormatError
from .fingerprint import content_fingerprint

RECIPE_KEY = "sftdiff.recipe"
RECIPE_VERSION = 1
CARD = "README.md"
TAGS = ["sftdiff", "sparse-fine-tuning"]
# Front-matter fields of a base's card that still describe the baked model (the rest, e.g.
# `model-index` with the base's scores or the base's own `base_model`, would mislead).
_KEPT_BASE_FIELDS = ("license", "license_name", "license_link", "language", "datasets", "pipeline_tag", "tags",
                     "extra_gated_prompt", "extra_gated_fields")
_HUB_SNAPSHOT = re.compile(r"(?:^|/)models--([^/]+?)--([^/]+)/snapshots/[^/]+/?$")


# ---------------------------------------------------------------- building (at bake time)


class Hashes:
    """The diffs' content fingerprints, computed in a background thread from the moment a bake has
    its diffs: sha256 releases the GIL, so hashing (0.6 s for the 69 MiB 1%-dense diff of a 1.2B
    model, measured on a busy 2-core VM) overlaps with checking the diffs against the base instead
    of adding to the bake's time. The
    thread is a daemon: an interrupted or refused bake does not wait for it."""

    def __init__(self, diffs: Sequence[Any]):
        self._diffs = list(diffs)
        self._results: list[Any] = [None] * len(self._diffs)
        # Only files are hashed in the background: an in-memory diff's entries may be computed
        # lazily, and that is left to the main thread.
        on_disk = [i for i, d in enumerate(self._diffs) if d.path and os.path.isfile(d.path)]

        def run() -> None:
            for i in on_disk:
                try:
                    self._results[i] = content_fingerprint(self._diffs[i])
                except BaseException as e:  # noqa: BLE001 - re-raised by result()
                    self._results[i] = e

        self._thread = threading.Thread(target=run, name="sftdiff-recipe-hash", daemon=True)
        self._thread.start()

    def result(self) -> list[tuple[str, str]]:
        self._thread.join()
        for i, r in enumerate(self._results):
            if isinstance(r, BaseException):
                raise r
            if r is None:
                self._results[i] = content_fingerprint(self._diffs[i])
        return self._results


def build(base: Any, layers: Sequence[Any], dtype: str | None, out: str | os.PathLike,
          hashes: Hashes | None = None, digests: Any = None) -> dict[str, Any]:
    """The recipe of baking `layers` (bake's `Layer`s: diff, scale, with_dense, label) into `base`
    (a `Checkpoint`) at `out`. Hashes each diff's file (or entries; `hashes`, when started earlier
    for the same diffs in order) and samples the base's tensors for its fingerprint, as `create` does
    (`digests`: the `verify.BaseDigests` verification already filled, so no tensor is sampled twice)."""
    from . import __version__
    from .fingerprint import model_fingerprint
    from .verify import BaseDigests

    hashes = hashes or Hashes([layer.diff for layer in layers])
    base_fingerprint = model_fingerprint((digests or BaseDigests(base)).all())
    diffs = []
    for layer, (fingerprint, of) in zip(layers, hashes.result()):
        d = layer.diff
        dense = sum(1 for name in d.entries if d.info(name).kind == "dense")
        diffs.append({
            "label": layer.label,
            "file": os.fspath(d.path) if d.path else None,
            "content_fingerprint": fingerprint,
            "fingerprint_of": of,
            "scale": float(layer.scale),
            "dense_entries": dense,
            "dense_used": bool(layer.with_dense and dense),
            "entries": len(d.entries),
            "base_fingerprint": d.meta.base_fingerprint,
            "user": dict(d.meta.user),
        })
    recipe = {
        "recipe_version": RECIPE_VERSION,
        "tool": f"sftdiff {__version__}",
        "base": {"hint": base.hint, "repo_id": hub_repo_id(base.hint),
                 "fingerprint": base_fingerprint},
        "diffs": diffs,
        "dtype": dtype or "keep",
        "command": cli_command(),
    }
    recipe["reproduce"] = recipe["command"] or reproduce_command(recipe, os.fspath(out))
    return recipe


def shard_metadata(recipe: dict[str, Any], metadata: dict[str, str]) -> dict[str, str]:
    """`metadata` (e.g. transformers' `{"format": "pt"}`) plus the recipe under `RECIPE_KEY`."""
    return {**metadata, RECIPE_KEY: json.dumps(recipe, sort_keys=True, ensure_ascii=False, separators=(",", ":"))}


def cli_command() -> str | None:
    """The command line of this process when it is the `sftdiff` CLI (`sftdiff ...` or
    `python -m sftdiff ...`), shell-quoted; None for library calls."""
    argv = sys.argv
    if not argv:
        return None
    prog = Path(argv[0])
    if prog.name == "sftdiff" or (prog.name == "__main__.py" and prog.parent.name == "sftdiff"):
        return shlex.join(["sftdiff", *argv[1:]])
    return None


def reproduce_command(recipe: dict[str, Any], out: str) -> str | None:
    """An `sftdiff apply` command equivalent to the recipe, or None when the base or a diff was in
    memory (nothing on disk to name)."""
    base = recipe["base"]["repo_id"] or recipe["base"]["hint"]
    files = [d["file"] for d in recipe["diffs"]]
    if not base or None in files:
        return None
    args = ["sftdiff", "apply", base, *files]
    scales = [d["scale"] for d in recipe["diffs"]]
    if any(s != 1.0 for s in scales):
        for s in scales:
            args += ["--scale", f"{s:g}"]
    for d in recipe["diffs"]:
        if d["dense_entries"] and not d["dense_used"]:
            args += ["--skip-dense", d["file"]]
    if recipe["dtype"] != "keep":
        args += ["--dtype", {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}.get(recipe["dtype"], recipe["dtype"])]
    return shlex.join(args + ["-o", out])


def hub_repo_id(path: str | None) -> str | None:
    """`org/name` for a folder inside a huggingface_hub cache (`models--org--name/snapshots/REV`)."""
    if not path:
        return None
    m = _HUB_SNAPSHOT.search(Path(path).as_posix())
    return f"{m.group(1)}/{m.group(2)}" if m else None


# ---------------------------------------------------------------- the model card


def write_card(folder: str | os.PathLike, base_path: str | None, recipe: dict[str, Any],
               title: str | None = None) -> Path:
    """Write `folder/README.md` (titled `title`, default the folder's name): Hub front matter, the
    recipe in prose, then the base's own card (from `base_path/README.md`, its front matter merged
    into ours) if it has one."""
    base_meta: dict[str, Any] = {}
    base_body = ""
    base_card = Path(base_path) / CARD if base_path and Path(base_path).is_dir() else None
    if base_card is not None and base_card.is_file():
        base_meta, base_body = split_front_matter(base_card.read_text(encoding="utf-8", errors="replace"))
    path = Path(folder) / CARD
    path.write_text(render_card(recipe, title or os.path.basename(os.path.normpath(folder)), base_meta, base_body),
                    encoding="utf-8")
    return path


def split_front_matter(text: str) -> tuple[dict[str, Any], str]:
    """(front matter as a dict, the rest) of a model card. A card without front matter, or with
    front matter that is not a YAML mapping, gives ({}, the text after it)."""
    m = re.match(r"\A---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(?:\r?\n|\Z)", text, re.DOTALL)
    if not m:
        return {}, text
    import yaml  # a dependency of transformers and huggingface_hub

    try:
        meta = yaml.safe_load(m.group(1))
    except yaml.YAMLError:
        meta = None
    return (meta if isinstance(meta, dict) else {}), text[m.end():]


# Characters JSON leaves as they are but YAML reads otherwise (line breaks, non-printables, BOM).
_YAML_SPECIAL = re.compile("[\x7f-\x9f\u2028\u2029\ufeff\ud800-\udfff\ufffe\uffff]")


def front_matter(meta: dict[str, Any]) -> str:
    """`meta` as YAML. Plain metadata (JSON types under identifier keys, the usual case) is written
    one `key: <JSON>` line per field, which YAML reads back as the same values, without importing
    PyYAML (tens of milliseconds on every `apply`); anything else (a date from a base's card, ...)
    through `yaml.safe_dump`."""
    try:
        if all(isinstance(k, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", k) for k in meta):
            text = "\n".join(f"{k}: {json.dumps(v, ensure_ascii=False, allow_nan=False)}" for k, v in meta.items())
            if not _YAML_SPECIAL.search(text):
                return text
    except (TypeError, ValueError):  # not JSON (a date, ...) or not finite: YAML spells it
        pass
    import yaml

    return yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).rstrip("\n")


def card_metadata(recipe: dict[str, Any], base_meta: dict[str, Any]) -> dict[str, Any]:
    """The card's front matter: ours (`base_model`, `library_name`, `tags`) over the fields of the
    base's card that still hold for the baked model."""
    meta: dict[str, Any] = {}
    repo = recipe["base"].get("repo_id")
    if repo:
        meta["base_model"] = repo
    meta["library_name"] = "transformers"
    base_tags = base_meta.get("tags")
    base_tags = [base_tags] if isinstance(base_tags, str) else list(base_tags or [])
    meta["tags"] = TAGS + [t for t in base_tags if isinstance(t, str) and t not in TAGS]
    meta.update({k: base_meta[k] for k in _KEPT_BASE_FIELDS if k in base_meta and k != "tags"})
    return meta


def render_card(recipe: dict[str, Any], title: str, base_meta: dict[str, Any] | None = None,
                base_body: str = "") -> str:
    """The README.md text for a baked folder named `title`."""
    meta = card_metadata(recipe, base_meta or {})
    base = recipe["base"]
    diffs = recipe["diffs"]
    base_name = base.get("repo_id") or base.get("hint") or "an in-memory base"
    lines = ["---", front_matter(meta), "---", "",
             f"# {title}", "",
             f"`{base_name}` with {len(diffs)} sparse fine-tuning diff{'s' if len(diffs) != 1 else ''} (LT-SFT, "
             f"Ansell et al., ACL 2022) added by {recipe['tool']} (`sftdiff apply`). It is an ordinary "
             "transformers checkpoint: load it with `from_pretrained` like its base.", "",
             "## Diffs", "", "Applied in this order:", "",
             "| # | diff | about | content fingerprint | scale | dense entries |",
             "|---|---|---|---|---|---|"]
    for i, d in enumerate(diffs, 1):
        about = ", ".join(f"{k}: {v}" for k, v in d["user"].items() if k != "description") or "-"
        dense = ("none" if not d["dense_entries"] else
                 f"{d['dense_entries']} used" if d["dense_used"] else f"{d['dense_entries']} left out (--skip-dense)")
        lines.append(f"| {i} | `{_cell(d['label'])}` | {_cell(about)} | `{d['content_fingerprint']}` "
                     f"(of the {d['fingerprint_of']}) | {d['scale']:g} | {dense} |")
    lines += ["", f"Base: `{base.get('hint') or '(in memory)'}`, fingerprint `{base['fingerprint']}`."]
    stale = [d["label"] for d in diffs if d["base_fingerprint"] and d["base_fingerprint"] != base["fingerprint"]]
    if stale:
        lines.append(f"Made from a base with another fingerprint: {', '.join(f'`{s}`' for s in stale)}.")
    if recipe["dtype"] != "keep":
        lines.append(f"Floating-point weights written as {recipe['dtype']}.")
    lines += ["", "## How to reproduce", ""]
    if recipe.get("reproduce"):
        said = "The command that wrote this folder:" if recipe.get("command") else "An equivalent command:"
        lines += [said, "", "```bash", recipe["reproduce"], "```"]
    else:
        lines.append("The base or a diff was an in-memory object when this was baked, so no command reproduces it.")
    lines += ["", f"Every weight file's safetensors metadata holds this recipe as JSON under `{RECIPE_KEY}`; "
              f"`sftdiff inspect {title}` prints it."]
    body = base_body.strip("\n")
    if body:
        lines += ["", "## The base model's card", "", body]
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


# ---------------------------------------------------------------- reading back (inspect)


def is_model_folder(path: str | os.PathLike) -> bool:
    """A folder holding safetensors weights as transformers saves them."""
    from .checkpoint import SAFETENSORS_INDEX, SAFETENSORS_SINGLE

    p = Path(path)
    return p.is_dir() and ((p / SAFETENSORS_SINGLE).is_file() or (p / SAFETENSORS_INDEX).is_file())


def read(path: str | os.PathLike) -> dict[str, Any]:
    """What a baked folder says it is: `{"path", "shards", "recipe", "card"}`; refuses a model folder
    whose shards hold no recipe or disagree about it."""
    from .checkpoint import SAFETENSORS_INDEX, SAFETENSORS_SINGLE
    from .safetensors_io import SafetensorsFile

    folder = Path(path)
    if (folder / SAFETENSORS_INDEX).is_file():
        try:
            index = json.loads((folder / SAFETENSORS_INDEX).read_text(encoding="utf-8"))
            shards = sorted(set(index["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise FormatError(f"{folder / SAFETENSORS_INDEX}: not a valid safetensors index") from None
    else:
        shards = [SAFETENSORS_SINGLE]
    texts = []
    for name in shards:
        texts.append(SafetensorsFile(folder / name).metadata.get(RECIPE_KEY))  # header only; data stays unmapped
    if texts[0] is None:
        raise FormatError(f"{folder}: model weights without an sftdiff recipe (metadata {RECIPE_KEY!r}); "
                          "inspect takes a diff, or a folder written by sftdiff apply")
    if any(t != texts[0] for t in texts):
        raise FormatError(f"{folder}: its shards record different sftdiff recipes; the folder mixes files of "
                          "several bakes")
    try:
        recipe = json.loads(texts[0])
    except ValueError:
        raise FormatError(f"{folder / shards[0]}: metadata {RECIPE_KEY!r} is not valid JSON") from None
    if not isinstance(recipe, dict) or not isinstance(recipe.get("diffs"), list) or "base" not in recipe:
        raise FormatError(f"{folder / shards[0]}: metadata {RECIPE_KEY!r} is not an sftdiff recipe")
    card = folder / CARD
    return {"path": os.fspath(path), "shards": shards, "recipe": recipe, "card": str(card) if card.is_file() else None}


def render(summary: dict[str, Any]) -> str:
    """`sftdiff inspect FOLDER`'s text: the recipe of a baked folder."""
    recipe = summary["recipe"]
    base = recipe.get("base", {})
    lines = [f"baked model: {summary['path']}  ({len(summary['shards'])} weight file"
             f"{'s' if len(summary['shards']) != 1 else ''}, by {recipe.get('tool', '?')})",
             f"base:        {base.get('repo_id') or base.get('hint') or '-'}  fingerprint {base.get('fingerprint') or '-'}",
             f"dtype:       {recipe.get('dtype', 'keep')}",
             f"diffs:       {len(recipe['diffs'])}, applied in this order:"]
    for i, d in enumerate(recipe["diffs"], 1):
        dense = ("no dense entries" if not d.get("dense_entries") else
                 f"{d['dense_entries']} dense entries {'used' if d.get('dense_used') else 'left out'}")
        about = ", ".join(f"{k}={v}" for k, v in (d.get("user") or {}).items() if k != "description")
        lines.append(f"  {i}. {d.get('label')}  scale {d.get('scale', 1.0):g}  {dense}"
                     + (f"  ({about})" if about else ""))
        lines.append(f"     {d.get('content_fingerprint')} (of the {d.get('fingerprint_of', 'file')})")
    if recipe.get("command"):
        lines.append(f"command:     {recipe['command']}")
    elif recipe.get("reproduce"):
        lines.append(f"reproduce:   {recipe['reproduce']}")
    lines.append(f"card:        {summary['card'] or '(none)'}")
    return "\n".join(lines)
