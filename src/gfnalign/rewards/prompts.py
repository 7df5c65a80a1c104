"""Prompt sets: built-in lists and loaders for txt / json / jsonl / csv prompt files.

``load_prompts(spec)`` -> :class:`PromptSet`. ``spec`` is a built-in name (``prompt_set_names()``: "digits",
"digits-all", "digits-open" (one prompt that leaves the digit open), "animals") or a path:

* ``.txt``: one prompt per line; blank lines and lines starting with ``#`` are skipped;
* ``.json``: a list of strings; a dict keyed by prompt (DrawBench style: ``{"A red colored car.":
  {"category": "Colors"}, ...}``); a list of dicts with a "prompt"/"Prompt" key (or ``column=``); or a
  dict with a "prompts" list. HPD benchmark files are plain lists of strings;
* ``.jsonl``: one JSON string or dict per line;
* ``.csv``: the column ``column`` (default: the first of prompt, Prompt, prompts, Prompts, text, caption).

A "category"/"Category" field, where present, is kept, so the papers' splits can be reproduced:
``skip_first=10`` (HPD: the first 10 prompts per style are held out), ``skip_first_per_category=2`` and
``exclude_categories=["Misspellings", "Rare Words"]`` (DrawBench: 200 -> 183 -> 165 training prompts).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

# A built-in list of 45 common animals (our own list, one word each).
ANIMALS: tuple[str, ...] = (
    "cat", "dog", "horse", "cow", "pig", "sheep", "goat", "rabbit", "mouse",
    "squirrel", "fox", "wolf", "bear", "deer", "lion", "tiger", "leopard",
    "elephant", "giraffe", "zebra", "kangaroo", "koala", "panda", "monkey",
    "gorilla", "camel", "llama", "raccoon", "hedgehog", "otter", "seal", "dolphin", "whale", "shark",
    "octopus", "turtle", "frog", "snake", "owl", "eagle", "parrot", "penguin", "duck",
    "chicken", "butterfly",
)

_DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Prompts of the digits world that leave the digit open (the pretraining phrasings without the digit):
# the pretrained model answers each with its own mixture of digits, which a cross-class reward can tilt.
DIGITS_OPEN_PROMPTS: tuple[str, ...] = ("a handwritten digit",)
_PROMPT_KEYS = ("prompt", "Prompt", "prompts", "Prompts", "text", "caption")
_CATEGORY_KEYS = ("category", "Category")


@dataclass(frozen=True)
class PromptSet:
    """A named, ordered list of prompts with optional per-prompt categories."""

    name: str
    prompts: tuple[str, ...]
    categories: tuple[str | None, ...] | None = field(default=None, compare=False)

    def __post_init__(self):
        prompts = tuple(self.prompts)
        if not prompts:
            raise ValueError(f"prompt set {self.name!r} is empty; give at least one prompt")
        for i, p in enumerate(prompts):
            if not isinstance(p, str) or not p.strip():
                raise ValueError(f"prompt set {self.name!r}: entry {i} must be a non-empty string, got {p!r}")
        object.__setattr__(self, "prompts", prompts)
        if self.categories is not None:
            cats = tuple(self.categories)
            if len(cats) != len(prompts):
                raise ValueError(f"prompt set {self.name!r}: {len(cats)} categories for {len(prompts)} prompts")
            object.__setattr__(self, "categories", cats)

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> str:
        return self.prompts[i]

    def __iter__(self):
        return iter(self.prompts)

    def sample(
        self, n: int, generator: torch.Generator | int | None = None
    ) -> tuple[list[str], torch.Tensor]:
        """``n`` prompts drawn uniformly with replacement: ``(prompts, indices [n] int64)``.

        ``generator`` is a ``torch.Generator`` (advanced in place), an int seed, or None (global RNG).
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"sample: n must be a non-negative int, got {n!r}")
        if isinstance(generator, int) and not isinstance(generator, bool):
            generator = torch.Generator().manual_seed(generator)
        idx = torch.randint(len(self.prompts), (n,), generator=generator, dtype=torch.int64)
        return [self.prompts[i] for i in idx.tolist()], idx

    def subset(self, indices: Iterable[int], name: str | None = None) -> PromptSet:
        indices = list(indices)
        cats = None if self.categories is None else [self.categories[i] for i in indices]
        return PromptSet(name or self.name, tuple(self.prompts[i] for i in indices), cats)


# ----------------------------------------------------------------------------------------------------------
# built-in sets


def _digit_prompts(all_phrasings: bool) -> list[str]:
    try:
        from gfnalign.backbones import digits as world
    except ImportError:  # same phrasing as the digits world
        return [f"a handwritten digit {n}" for n in _DIGIT_NAMES]
    if all_phrasings:
        return [p for p, _ in world.all_digit_prompts()]
    return list(world.DIGIT_PROMPTS)


def _builtin(name: str) -> PromptSet | None:
    if name == "digits":
        return PromptSet("digits", tuple(_digit_prompts(False)))
    if name == "digits-all":
        return PromptSet("digits-all", tuple(_digit_prompts(True)))
    if name == "digits-open":
        return PromptSet("digits-open", DIGITS_OPEN_PROMPTS)
    if name == "animals":
        return PromptSet("animals", ANIMALS)
    return None


def prompt_set_names() -> list[str]:
    """Names of the built-in prompt sets."""
    return ["animals", "digits", "digits-all", "digits-open"]


# ----------------------------------------------------------------------------------------------------------
# file loaders


def _pick_key(keys: Sequence[str], column: str | None, where: str) -> str:
    if column is not None:
        if column not in keys:
            raise ValueError(f"{where}: no column/key {column!r}; available: {list(keys)}")
        return column
    for k in _PROMPT_KEYS:
        if k in keys:
            return k
    raise ValueError(f"{where}: none of the prompt keys {list(_PROMPT_KEYS)} found (have {list(keys)}); pass column=")


def _category_of(record: Any) -> str | None:
    if isinstance(record, dict):
        for k in _CATEGORY_KEYS:
            if k in record and record[k] is not None:
                return str(record[k])
    return None


def _from_records(records: list[Any], column: str | None, where: str) -> tuple[list[str], list[str | None]]:
    prompts, cats = [], []
    for i, rec in enumerate(records):
        if isinstance(rec, str):
            prompts.append(rec)
            cats.append(None)
        elif isinstance(rec, dict):
            key = _pick_key(list(rec), column, f"{where} entry {i}")
            prompts.append(rec[key])
            cats.append(_category_of(rec))
        else:
            raise ValueError(f"{where}: entry {i} must be a string or an object with a prompt key, got {rec!r}")
    return prompts, cats


def _load_json(path: Path, column: str | None) -> tuple[list[str], list[str | None]]:
    where = str(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: not valid JSON ({err})") from err
    if isinstance(data, dict) and isinstance(data.get("prompts"), list) and column is None:
        data = data["prompts"]
    if isinstance(data, list):
        return _from_records(data, column, where)
    if isinstance(data, dict):  # keyed by prompt (DrawBench style)
        return list(data), [_category_of(v) for v in data.values()]
    raise ValueError(f"{where}: expected a JSON list or object of prompts, got {type(data).__name__}")


def _load_jsonl(path: Path, column: str | None) -> tuple[list[str], list[str | None]]:
    records = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{n}: not valid JSON ({err})") from err
    return _from_records(records, column, str(path))


def _load_csv(path: Path, column: str | None) -> tuple[list[str], list[str | None]]:
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames:
            raise ValueError(f"{path}: the CSV file has no header row; the first row must name the columns")
        key = _pick_key(list(reader.fieldnames), column, str(path))
        prompts, cats = [], []
        for row in reader:
            text = (row.get(key) or "").strip()
            if text:
                prompts.append(text)
                cats.append(_category_of(row))
    return prompts, cats


def _load_txt(path: Path) -> tuple[list[str], list[str | None]]:
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    prompts = [ln for ln in lines if ln and not ln.startswith("#")]
    return prompts, [None] * len(prompts)


def load_prompts(
    spec: str | Path | PromptSet | Sequence[str],
    *,
    column: str | None = None,
    skip_first: int = 0,
    skip_first_per_category: int = 0,
    exclude_categories: Sequence[str] = (),
    name: str | None = None,
) -> PromptSet:
    """A :class:`PromptSet` from a built-in name, a file path, a list of strings or a PromptSet.

    ``skip_first`` drops the first k prompts; ``skip_first_per_category`` the first k of each category (after
    ``exclude_categories`` removed whole categories) — the papers' held-out splits.
    """
    if isinstance(spec, PromptSet):
        base = spec
    elif isinstance(spec, (list, tuple)):
        base = PromptSet(name or "custom", tuple(spec))
    elif isinstance(spec, (str, Path)):
        builtin = _builtin(str(spec)) if isinstance(spec, str) else None
        if builtin is not None:
            base = builtin
        else:
            path = Path(spec).expanduser()
            if not path.is_file():
                raise FileNotFoundError(
                    f"prompt set {str(spec)!r} is neither a built-in ({', '.join(prompt_set_names())}) nor an "
                    f"existing file (looked for {str(path.resolve())!r})"
                )
            suffix = path.suffix.lower()
            if suffix == ".json":
                prompts, cats = _load_json(path, column)
            elif suffix == ".jsonl":
                prompts, cats = _load_jsonl(path, column)
            elif suffix == ".csv":
                prompts, cats = _load_csv(path, column)
            elif suffix in (".txt", ""):
                prompts, cats = _load_txt(path)
            else:
                raise ValueError(f"prompt file {str(path)!r}: unknown extension {suffix!r}; use .txt, .json, .jsonl or .csv")
            base = PromptSet(name or path.stem, tuple(prompts), tuple(cats) if any(c is not None for c in cats) else None)
    else:
        raise TypeError(f"prompt set spec must be a name, a path or a list of strings, got {type(spec).__name__}")

    keep = list(range(len(base)))
    if exclude_categories:
        if base.categories is None:
            raise ValueError(f"prompt set {base.name!r} has no categories; exclude_categories needs them")
        excluded = set(exclude_categories)
        keep = [i for i in keep if base.categories[i] not in excluded]
    if skip_first_per_category:
        if base.categories is None:
            raise ValueError(f"prompt set {base.name!r} has no categories; skip_first_per_category needs them")
        seen: dict[str | None, int] = {}
        kept = []
        for i in keep:
            c = base.categories[i]
            seen[c] = seen.get(c, 0) + 1
            if seen[c] > skip_first_per_category:
                kept.append(i)
        keep = kept
    if skip_first:
        keep = keep[skip_first:]
    if len(keep) == len(base) and name is None:
        return base
    if not keep:
        raise ValueError(f"prompt set {base.name!r}: the split options removed every prompt")
    return base.subset(keep, name or base.name)
