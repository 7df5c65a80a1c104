"""Write docs/configuration.md from the config dataclasses (and the objectives' options), so it cannot drift.

    python scripts/gen_config_reference.py           # rewrite docs/configuration.md
    python scripts/gen_config_reference.py --check   # exit 1 if the checked-in page differs

Every key of ``gfnalign.training.config.TrainConfig`` is listed with its type, its default and the comment
written beside the field in ``config.py``; ``method.options`` is listed per registered method from the
objectives' constructor signatures. tests/unit/test_docs_config_reference.py runs the check.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import io
import sys
import tokenize
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
PAGE = REPO / "docs" / "configuration.md"
#: options the trainer fills in from the backbone (never written in a config)
TRAINER_FILLED = {"state_shape", "cond_dim", "num_train_timesteps", "eta", "log_flow_head", "flow_score_head"}


def field_comments(cls: type) -> dict[str, str]:
    """``name -> comment`` of the dataclass fields as written in the class body: the comment at the end of
    the field's line, else the comment lines directly above it."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    out: dict[str, str] = {}
    current: str | None = None
    above: list[str] = []  # the comment-only lines directly above the current line
    line_has_code = line_has_comment = False
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.NAME and tok.start[1] == 4 and current is None and not line_has_code:
            current = tok.string
        if tok.type == tokenize.COMMENT:
            line_has_comment = True
            text = tok.string.lstrip("#").strip()
            if current is not None:
                out.setdefault(current, text)
            elif not line_has_code:
                above.append(text)
        elif tok.type in (tokenize.NEWLINE, tokenize.NL):
            if current is not None:
                if current not in out and above:
                    out[current] = " ".join(above)
                above = []
            elif not line_has_comment:  # a blank line or other code ends a comment block
                above = []
            current, line_has_code, line_has_comment = None, False, False
        elif tok.type not in (tokenize.INDENT, tokenize.DEDENT):
            line_has_code = True
    return out


def _value(v: Any) -> str:
    if dataclasses.is_dataclass(v):
        return "(section)"
    text = yaml.safe_dump(v, default_flow_style=True, width=10_000).strip()
    if text.endswith("\n..."):
        text = text[:-4].strip()
    return text.removesuffix("...").strip() or "''"


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def section(cls: type, prefix: str, lines: list[str], nested: list[tuple[type, str]]) -> None:
    comments = field_comments(cls)
    doc = (cls.__doc__ or "").strip()
    if doc and not doc.startswith(cls.__name__ + "("):  # dataclasses' generated signature is not a docstring
        lines += [doc, ""]
    lines += ["| key | type | default | meaning |", "|---|---|---|---|"]
    for f in dataclasses.fields(cls):
        default = _default(f)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(default):
            nested.append((type(default), key + "."))
            meaning = f"section, see [`{key}`](#{key.replace('.', '')})"
        else:
            meaning = comments.get(f.name, "")
        lines.append(f"| `{key}` | `{_cell(str(f.type))}` | `{_cell(_value(default))}` | {_cell(meaning)} |")
    lines.append("")


def method_options() -> list[str]:
    import gfnalign.objectives  # noqa: F401  (registers the built-ins)
    from gfnalign.objectives.base import REGISTRY

    lines = ["## `method.options` by method", "",
             "Keyword options of each registered objective (from its constructor; the trainer fills in "
             f"{', '.join(f'`{n}`' for n in sorted(TRAINER_FILLED))} itself). An unknown option is rejected "
             "before any model loads. What they mean: each objective's docstring (`gfnalign list methods`, "
             "`help(gfnalign.objectives.DAGDB)`).", ""]
    for name in sorted(REGISTRY):
        factory = REGISTRY[name]
        opts: dict[str, Any] = {}
        for klass in getattr(factory, "__mro__", (factory,)):
            init = klass.__dict__.get("__init__") if isinstance(factory, type) else klass
            if init is None:
                continue
            params = inspect.signature(init).parameters
            for p in params.values():
                if p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) or p.name == "self" or p.name in TRAINER_FILLED:
                    continue
                opts.setdefault(p.name, p.default)
            if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
                break
        shown = ", ".join(f"`{k}={_value(None if v is inspect.Parameter.empty else v)}`" for k, v in sorted(opts.items()))
        lines.append(f"- **`{name}`**: {shown or '(none)'}")
    lines.append("")
    return lines


def render() -> str:
    from gfnalign.training.config import TrainConfig

    lines = [
        "# Configuration reference",
        "",
        "<!-- GENERATED by scripts/gen_config_reference.py from src/gfnalign/training/config.py; do not edit. -->",
        "",
        "A run is one YAML file (or a dict for `gfnalign.load_config`). Every key is optional except "
        "`method.name`; `--set key.path=value` (CLI) or `load_config(src, {\"key.path\": value})` (Python) "
        "override any of them. A bad value is rejected before any model loads, with the field, the value "
        "and what is allowed. The shipped presets are in `configs/` (`gfnalign list presets`).",
        "",
        "## Top level",
        "",
    ]
    nested: list[tuple[type, str]] = []
    section(TrainConfig, "", lines, nested)
    while nested:
        cls, prefix = nested.pop(0)
        lines += [f"## `{prefix.rstrip('.')}`", ""]
        section(cls, prefix, lines, nested)
    lines += method_options()
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/configuration.md is out of date")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not PAGE.is_file() or PAGE.read_text() != text:
            print(f"{PAGE.relative_to(REPO)} is out of date; run: python scripts/gen_config_reference.py",
                  file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(text)
    print(f"wrote {PAGE.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
