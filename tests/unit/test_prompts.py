"""Prompt sets: built-ins, txt/json/jsonl/csv loaders, the DrawBench/HPD files and the papers' splits."""

from __future__ import annotations

import json
import math

import pytest
import torch

from gfnalign.rewards import PromptSet, load_prompts, prompt_set_names
from gfnalign.rewards.prompts import ANIMALS


def test_builtin_sets():
    assert {"digits", "animals"} <= set(prompt_set_names())
    digits = load_prompts("digits")
    assert len(digits) == 10 and digits.prompts[7] == "a handwritten digit seven"
    animals = load_prompts("animals")
    assert len(animals) == len(ANIMALS) == 45 and len(set(animals)) == 45
    assert len(load_prompts("digits-all")) >= 10


def test_sample_uniform_with_replacement_and_reproducible():
    ps = PromptSet("abc", ("a", "b", "c"))
    prompts, idx = ps.sample(6000, generator=torch.Generator().manual_seed(0))
    assert idx.dtype == torch.int64 and idx.shape == (6000,)
    assert prompts == [ps[i] for i in idx.tolist()]
    counts = torch.bincount(idx, minlength=3).double()
    # binomial std of each count: sqrt(n p (1-p)) = sqrt(6000 * 1/3 * 2/3) ≈ 36.5; allow 5 sigma
    assert (counts - 2000).abs().max() < 5 * math.sqrt(6000 * (1 / 3) * (2 / 3))
    assert ps.sample(5, generator=7)[0] == ps.sample(5, generator=7)[0]
    with pytest.raises(ValueError, match="non-negative"):
        ps.sample(-1)


def test_txt_json_jsonl_csv_loaders(tmp_path):
    (tmp_path / "p.txt").write_text("# comment\na cat\n\n  a dog  \n#another\na fox\n")
    assert load_prompts(tmp_path / "p.txt").prompts == ("a cat", "a dog", "a fox")

    (tmp_path / "list.json").write_text(json.dumps(["x", "y"]))
    assert load_prompts(str(tmp_path / "list.json")).prompts == ("x", "y")
    (tmp_path / "dicts.json").write_text(json.dumps([{"Prompt": "x", "Category": "A"}, {"Prompt": "y", "Category": "B"}]))
    ps = load_prompts(tmp_path / "dicts.json")
    assert ps.prompts == ("x", "y") and ps.categories == ("A", "B")
    (tmp_path / "custom.json").write_text(json.dumps([{"caption_en": "x"}, {"caption_en": "y"}]))
    assert load_prompts(tmp_path / "custom.json", column="caption_en").prompts == ("x", "y")
    (tmp_path / "wrapped.json").write_text(json.dumps({"prompts": ["x", "y", "z"]}))
    assert len(load_prompts(tmp_path / "wrapped.json")) == 3
    (tmp_path / "keyed.json").write_text(json.dumps({"x": {"category": "A"}, "y": {"category": "A"}}))
    assert load_prompts(tmp_path / "keyed.json").categories == ("A", "A")

    (tmp_path / "p.jsonl").write_text('"x"\n{"prompt": "y"}\n\n')
    assert load_prompts(tmp_path / "p.jsonl").prompts == ("x", "y")

    (tmp_path / "p.csv").write_text('Prompts,Category\n"a cat, sitting",Animals\na car,Things\n,Empty\n')
    ps = load_prompts(tmp_path / "p.csv")
    assert ps.prompts == ("a cat, sitting", "a car") and ps.categories == ("Animals", "Things")
    (tmp_path / "q.csv").write_text("id,text_en\n1,hello\n2,world\n")
    assert load_prompts(tmp_path / "q.csv", column="text_en").prompts == ("hello", "world")


def test_loader_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a built-in"):
        load_prompts("no-such-set")
    (tmp_path / "q.csv").write_text("id,text_en\n1,hello\n")
    with pytest.raises(ValueError, match="pass column="):
        load_prompts(tmp_path / "q.csv")
    with pytest.raises(ValueError, match="no column/key 'nope'"):
        load_prompts(tmp_path / "q.csv", column="nope")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_prompts(tmp_path / "bad.json")
    (tmp_path / "empty.txt").write_text("# only a comment\n")
    with pytest.raises(ValueError, match="empty"):
        load_prompts(tmp_path / "empty.txt")
    (tmp_path / "p.yaml").write_text("- a\n")
    with pytest.raises(ValueError, match="unknown extension"):
        load_prompts(tmp_path / "p.yaml")
    with pytest.raises(ValueError, match="no categories"):
        load_prompts("animals", skip_first_per_category=1)


def test_drawbench_file_and_dag_split(shared_data):
    path = shared_data / "drawbench_prompts.json"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    ps = load_prompts(path)
    assert len(ps) == 183 and ps.categories is not None
    assert ps.prompts[0] == "A red colored car." and ps.categories[0] == "Colors"
    assert len(set(ps.categories)) == 9
    # DAG: the first 2 prompts of each of the 9 categories are held out -> 165 training prompts
    train = load_prompts(path, skip_first_per_category=2)
    assert len(train) == 165 and "A red colored car." not in train.prompts
    assert len(load_prompts(path, exclude_categories=["Colors"])) == 183 - ps.categories.count("Colors")


def test_hpd_photo_file_and_split(shared_data):
    path = shared_data / "hpdv2_benchmark_photo_prompts.json"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    ps = load_prompts(path)
    assert len(ps) == 800 and ps.categories is None
    train = load_prompts(path, skip_first=10, name="hpd_photo")
    assert len(train) == 790 and train.name == "hpd_photo" and train.prompts[0] == ps.prompts[10]
    prompts, idx = train.sample(8, generator=0)
    assert len(prompts) == 8 and int(idx.max()) < 790
