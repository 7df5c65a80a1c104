"""No tracked file may carry an absolute path of the machine it was built on.

The paths are derived here at test time (never written down): this checkout's root, the main checkout's
root when this is a git worktree, and the ``shared`` folder beside them (its real path too).
"""

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout


def machine_paths() -> set[str]:
    roots = {REPO}
    common = Path(_git("rev-parse", "--git-common-dir").strip())
    common = common if common.is_absolute() else (REPO / common)
    roots.add(common.resolve().parent)  # the main checkout when REPO is a worktree
    paths = set()
    for root in roots:
        paths.add(str(root))
        shared = root.parent / "shared"
        paths.add(str(shared))
        if shared.exists():
            paths.add(str(shared.resolve()))
    # a root directly under / (e.g. a container's /repo) would match too much prose; still check its subpaths
    return {p for p in paths if p.count("/") >= 2 or len(p) > 6}


def test_tracked_files_hold_no_absolute_machine_paths():
    try:
        files = _git("ls-files", "-z").split("\0")
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    patterns = {p: re.compile(re.escape(p) + r"(?![\w.-])") for p in machine_paths()}
    hits = []
    for name in filter(None, files):
        path = REPO / name
        if not path.is_file() or path.stat().st_size > 2_000_000:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # binary (weights, images)
        for p, rx in patterns.items():
            for m in rx.finditer(text):
                line = text.count("\n", 0, m.start()) + 1
                hits.append(f"{name}:{line}: {p}")
    assert not hits, "absolute machine paths in tracked files (use relative paths):\n" + "\n".join(hits[:30])


def test_the_check_would_catch_a_path(tmp_path):
    # the same pattern matches the root followed by a separator or at the end, not a longer sibling name
    root = str(REPO)
    rx = re.compile(re.escape(root) + r"(?![\w.-])")
    assert rx.search(f"see {root}/src/x.py") and rx.search(f"cd {root}\n")
    assert not rx.search(f"{root}-other/x")
