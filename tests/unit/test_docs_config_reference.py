"""docs/configuration.md is generated from the config dataclasses; it must match the code."""

import dataclasses
import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _generator():
    spec = importlib.util.spec_from_file_location("gen_config_reference", REPO / "scripts" / "gen_config_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_configuration_page_is_up_to_date():
    gen = _generator()
    page = REPO / "docs" / "configuration.md"
    assert page.read_text() == gen.render(), (
        "docs/configuration.md is out of date with src/gfnalign/training/config.py (or an objective's options); "
        "regenerate it with: python scripts/gen_config_reference.py")


def test_every_config_key_is_documented():
    from gfnalign.training.config import TrainConfig

    text = (REPO / "docs" / "configuration.md").read_text()

    def keys(cls, prefix=""):
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            yield prefix + f.name
            if dataclasses.is_dataclass(default):
                yield from keys(type(default), prefix + f.name + ".")

    missing = [k for k in keys(TrainConfig) if f"| `{k}` |" not in text]
    assert not missing, missing
    assert "| `logging.wandb.mode` |" in text  # a nested-nested key


@dataclasses.dataclass
class _Example:
    with_comment: int = 1  # explained here
    without_comment: int = 2
    listed: list = dataclasses.field(default_factory=lambda: [1, 2])  # a factory, then a comment
    # a long explanation
    # on two lines
    commented_above: int = 3
    # a block comment, then a blank line: not about the next field

    after_blank: int = 4
    # a comment above a field that has its own
    both: int = 5  # its own wins


def test_field_comments_are_read_from_the_source():
    from gfnalign.training.config import LoggingConfig

    gen = _generator()
    assert gen.field_comments(LoggingConfig)["log_every"] == "updates between metrics.jsonl lines"
    # a field without a comment gets none (not its neighbour's)
    assert gen.field_comments(_Example) == {"with_comment": "explained here", "listed": "a factory, then a comment",
                                            "commented_above": "a long explanation on two lines",
                                            "both": "its own wins"}
    from gfnalign.training.config import MemoryConfig

    assert gen.field_comments(MemoryConfig)["budget_gb"].startswith("activation memory one batched pass may use")
