"""Run the code blocks of README.md and every docs page, in page order, on the digits world and the toy
with tiny budgets (tests/docs_snippets.py). Only blocks with a skip tag may be left out."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.docs_snippets import REPO, blocks, pages

pytestmark = pytest.mark.e2e
RUNNABLE = [p for p in pages() if any(not b.skip_tag for b in blocks(p))]


@pytest.mark.parametrize("page", RUNNABLE, ids=lambda p: p.name)
def test_page_code_blocks_run(page: Path, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1",
               OMP_WAIT_POLICY="PASSIVE", WANDB_MODE="offline", WANDB_SILENT="true", PYTHONUNBUFFERED="1",
               TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), str(REPO), env.get("PYTHONPATH", "")])
    res = subprocess.run([sys.executable, str(REPO / "tests" / "docs_snippets.py"), str(page), str(tmp_path / "work")],
                         capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert res.returncode == 0, (res.stdout[-4000:] + "\n" + res.stderr[-6000:])
    expected = blocks(page)
    ok = [ln for ln in res.stdout.splitlines() if ln.startswith("[docs] ") and ln.endswith(")") and " ok (" in ln]
    skipped = [ln for ln in res.stdout.splitlines() if ln.startswith("[docs] ") and ": skipped (" in ln]
    assert len(ok) == sum(1 for b in expected if not b.skip_tag), res.stdout
    assert len(skipped) == sum(1 for b in expected if b.skip_tag), res.stdout
