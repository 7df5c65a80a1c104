"""Extract and run the code blocks of README.md and docs/*.md (used by the docs tests).

Every fenced block needs a language. ``python`` blocks run in one namespace per page, in page order;
``bash`` blocks run in a shell in the same working folder, with a ``gfnalign`` on PATH that appends tiny
budgets (one epoch, a few images, a few toy updates) so each command takes seconds; ``yaml`` and ``json``
blocks are parsed (``text`` blocks, for file trees, must hold no code), and a YAML block that looks like a config is validated with ``gfnalign.load_config``.

A block is skipped only when its fence carries one of :data:`SKIP_TAGS` (e.g. ```` ```bash needs-gpu ````);
the tests check that each tag is used only where its reason holds.

    python tests/docs_snippets.py PAGE.md WORKDIR     # run one page (what the e2e test does)
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LANGUAGES = {"python", "bash", "yaml", "json", "text"}
#: a pattern no ``text`` block (file trees, plain output) may match: code must be marked as code, and run
CODE_IN_TEXT = r"(?m)^\s*(\$ |gfnalign |python |import |from \w+ import|pip |make |def |class )"
#: tag -> (why the block cannot run in CI, a pattern its code must match for the tag to be justified)
SKIP_TAGS: dict[str, tuple[str, str]] = {
    "needs-gpu": ("needs a GPU or model weights that are not shipped (Stable Diffusion, SD3, FLUX, CLIP, aesthetic)",
                  r"sd15|sdxl|sd3|flux|stable-diffusion|cuda|/models/|accelerate launch|torchrun|benchmarks/gpu_"),
    "needs-install": ("creates an environment or installs packages", r"\bmake (demo|test|setup)\b|\bpip install\b|git clone"),
    "long": ("reproduces a published number at full budget (minutes to hours)",
             r"benchmarks/|scripts/pretrain|train_toy\(|toy_exactness"),
    "server": ("starts a server that runs until stopped", r"\bserve\b"),
}
#: appended to `gfnalign` commands in CI so they finish in seconds (argparse / --set: the last value wins)
TINY_TRAIN = ["--set", "training.epochs=1", "--set", "sampling.num_steps=4", "--set", "sampling.batch_size=4",
              "--set", "sampling.batches_per_epoch=1", "--set", "training.max_updates_per_epoch=1",
              "--set", "logging.eval_samples=4", "--set", "logging.grid_prompts=2", "--set", "logging.progress=false"]
TINY_ARGS = {"demo": [*TINY_TRAIN, "--target-samples", "16", "--tilt-samples", "8"], "train": TINY_TRAIN, "eval": ["--samples", "2", "--max-prompts", "2"],
             "sample": ["--n", "1"], "toy": ["--steps", "5", "--samples", "2000", "--quiet"]}


@dataclass
class Block:
    page: str
    line: int
    language: str
    tags: list[str] = field(default_factory=list)
    code: str = ""

    @property
    def skip_tag(self) -> str | None:
        found = [t for t in self.tags if t in SKIP_TAGS]
        return found[0] if found else None


FENCE = re.compile(r"^(\s*)```(.*)$")


def pages() -> list[Path]:
    return [REPO / "README.md", REPO / "CONTRIBUTING.md", *sorted((REPO / "docs").glob("*.md"))]


def blocks(path: Path) -> list[Block]:
    out: list[Block] = []
    current: Block | None = None
    indent = ""
    for i, line in enumerate(path.read_text().splitlines(), start=1):
        m = FENCE.match(line)
        if current is None and m:
            indent, info = m.group(1), m.group(2).split()
            current = Block(str(path.relative_to(REPO)), i, info[0] if info else "", info[1:])
        elif current is not None and m and m.group(2).strip() == "":
            out.append(current)
            current = None
        elif current is not None:
            current.code += (line[len(indent):] if line.startswith(indent) else line) + "\n"
    if current is not None:
        raise ValueError(f"{path}:{current.line}: code block is never closed")
    return out


def _shim(bin_dir: Path) -> None:
    """A `gfnalign` executable that runs this checkout's CLI with the tiny budgets appended."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    script = bin_dir / "gfnalign"
    script.write_text(
        f"#!{sys.executable}\n"
        "import sys\n"
        f"sys.path.insert(0, {str(REPO / 'src')!r})\n"
        "from gfnalign.cli.main import main\n"
        f"TINY = {TINY_ARGS!r}\n"
        "args = sys.argv[1:]\n"
        "if args and args[0] in TINY and not {'--print-config', '--validate-only', '--help'} & set(args):\n"
        "    args += TINY[args[0]]\n"
        "sys.exit(main(args))\n"
    )
    script.chmod(0o755)


def _looks_like_config(data: object) -> bool:
    from gfnalign.training.config import TrainConfig

    keys = {f for f in TrainConfig.__dataclass_fields__}
    return isinstance(data, dict) and bool(data) and set(data) <= keys


def run_page(page: Path, workdir: Path) -> int:
    """Run every non-skipped block of ``page`` in order inside ``workdir``; returns the number run."""
    import yaml

    workdir.mkdir(parents=True, exist_ok=True)
    os.chdir(workdir)
    if not (workdir / "configs").exists():
        (workdir / "configs").symlink_to(REPO / "configs")
    bin_dir = workdir / ".bin"
    _shim(bin_dir)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    namespace: dict[str, object] = {"__name__": "__main__"}
    ran = 0
    for b in blocks(page):
        where = f"{b.page}:{b.line}"
        if b.skip_tag:
            print(f"[docs] {where}: skipped ({b.skip_tag}: {SKIP_TAGS[b.skip_tag][0]})", flush=True)
            continue
        t0 = time.perf_counter()
        if b.language == "python":
            exec(compile(b.code, where, "exec"), namespace)  # noqa: S102 - the docs' own code
        elif b.language == "bash":
            res = subprocess.run(["bash", "-euo", "pipefail", "-c", b.code], cwd=workdir, env=env)
            if res.returncode != 0:
                raise RuntimeError(f"{where}: the bash block exited with {res.returncode}:\n{b.code}")
        elif b.language == "yaml":
            data = yaml.safe_load(b.code)
            if _looks_like_config(data):
                from gfnalign.api import load_config

                load_config(data)
        elif b.language == "json":
            json.loads(b.code)
        elif b.language == "text":
            if re.search(CODE_IN_TEXT, b.code):
                raise ValueError(f"{where}: a text block holds code; mark it python or bash so it runs")
        else:
            raise ValueError(f"{where}: unknown code block language {b.language!r}")
        ran += 1
        print(f"[docs] {where}: {b.language} ok ({time.perf_counter() - t0:.1f} s)", flush=True)
    return ran


if __name__ == "__main__":
    page_arg, work_arg = sys.argv[1:3]
    n = run_page(Path(page_arg).resolve(), Path(work_arg).resolve())
    print(f"[docs] {page_arg}: {n} blocks ran")
