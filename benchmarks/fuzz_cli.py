"""Fuzz the command line like a hostile-but-fair user: generated bad configs and arguments (counting raw
tracebacks), and random SIGKILLs of a training run (counting runs that do not resume to the bit-exact result
of an uninterrupted one).

    PYTHONPATH=src:. python benchmarks/fuzz_cli.py --kills 30 [--seed 0] [--json fuzz.json]

Part 1 runs ``gfnalign train --validate-only`` in-process for every config field x a list of bad values,
plus ``gfnalign eval`` / ``gfnalign sample`` with damaged weights and bad counts against one tiny run. An
outcome is "named" (exit != 0 with a one-line message), "accepted" (the value is legal for that field) or
"traceback" (an exception escaped, or a traceback was printed). Part 2 SIGKILLs ``gfnalign train`` at random
times (uniform over an uninterrupted run's wall time, so some land in checkpoint writes), restarts it with
``--resume latest`` and compares the finished run with the uninterrupted one (LoRA bytes, tensors, metrics).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "src"))

BAD_VALUES = ["abc", "-1", "0", ".nan", ".inf", "[1, 2]", "{a: 1}", "null", "1e400", "2.5"]


def leaf_fields() -> list[str]:
    from gfnalign.training.config import TrainConfig

    out = []

    def walk(obj, prefix):
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value) and f"{prefix}{f.name}" != "method.options":
                walk(value, f"{prefix}{f.name}.")
            else:
                out.append(f"{prefix}{f.name}")

    walk(TrainConfig(), "")
    return out + ["method.options.fraction", "method.options.trust_region", "method.options.bogus"]


def call_cli(argv: list[str]) -> tuple[str, str]:
    """Run the CLI in-process; returns (outcome, last stderr line)."""
    from gfnalign.cli.main import main

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(argv)
    except SystemExit as exc:  # argparse's own usage errors
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException as exc:  # noqa: BLE001 - this is what the fuzzer counts
        return "traceback", f"{type(exc).__name__}: {exc}"[:300]
    text = err.getvalue()
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith(("Loading", "\r"))]
    if "Traceback (most recent call last)" in text:
        return "traceback", lines[-1] if lines else ""
    return ("accepted" if code == 0 else "named"), (lines[-1] if lines else "")


def fuzz_configs(tmp: Path) -> list[dict]:
    config = tmp / "base.yaml"
    config.write_text("method: {name: dag-db}\nreward: ink\nprompts: digits\n")
    rows = []
    for field in leaf_fields():
        for value in BAD_VALUES:
            argv = ["train", "--config", str(config), "--out", str(tmp / "never"), "--validate-only",
                    "--set", f"{field}={value}"]
            outcome, line = call_cli(argv)
            rows.append({"input": f"--set {field}={value}", "outcome": outcome, "message": line})
    return rows


def tiny_run(tmp: Path) -> Path:
    from gfnalign.training.config import TrainConfig
    from gfnalign.training.trainer import Trainer
    from tests.integration._train_utils import tiny_config, tiny_pipeline

    cfg = TrainConfig.from_dict(tiny_config(tiny_pipeline(tmp), "dag-db", {"fraction": 0.5},
                                            training={"epochs": 1, "micro_batch": 2, "max_updates_per_epoch": 1}))
    run = tmp / "run"
    Trainer(cfg, run).train()
    return run


def fuzz_eval_sample(tmp: Path) -> list[dict]:
    import torch
    from safetensors.torch import load_file, save_file

    run = tiny_run(tmp)
    lora_file = "pytorch_lora_weights.safetensors"

    def damaged(name, fn):
        d = tmp / f"lora-{name}"
        shutil.copytree(run / "final", d)
        fn(d / lora_file)
        return d

    def nan(f):
        t = load_file(str(f))
        save_file({k: torch.full_like(v, float("nan")) for k, v in t.items()}, str(f))

    def wider(f):
        save_file({k: torch.cat([v, v]) for k, v in load_file(str(f)).items()}, str(f))

    loras = {
        "truncated": damaged("truncated", lambda f: f.write_bytes(f.read_bytes()[:100])),
        "garbage": damaged("garbage", lambda f: f.write_bytes(b"\x00" * 64)),
        "empty": damaged("empty", lambda f: f.write_bytes(b"")),
        "nan": damaged("nan", nan),
        "wrong-rank": damaged("wider", wider),
        "missing": tmp / "no-such-lora",
    }
    rows = []
    prompt = ["--prompt", "a handwritten digit 2"]
    for name, lora in loras.items():
        for argv in (["sample", "--lora", str(lora), "--n", "1", "--out", str(tmp / "png")] + prompt,
                     ["eval", "--run", str(run), "--lora", str(lora), "--samples", "2", "--no-report"]):
            outcome, line = call_cli(argv)
            rows.append({"input": f"{argv[0]} with {name} weights", "outcome": outcome, "message": line})
    counts = [("sample", "--n", v) for v in ("0", "-3", "x")] + [("sample", "--batch-size", v) for v in ("0", "-1")] \
        + [("sample", "--steps", v) for v in ("0", "-5")] + [("sample", "--guidance", v) for v in ("nan", "0", "-1")] \
        + [("eval", "--samples", v) for v in ("0", "1", "x")] + [("eval", "--batch-size", v) for v in ("0", "-2")] \
        + [("eval", "--max-prompts", v) for v in ("0", "-1")] + [("eval", "--seed", "-1")]
    for cmd, flag, value in counts:
        argv = [cmd, "--run", str(run), flag, value]
        argv += ["--out", str(tmp / "png")] + prompt if cmd == "sample" else ["--no-report"]
        outcome, line = call_cli(argv)
        rows.append({"input": f"{cmd} {flag} {value}", "outcome": outcome, "message": line})
    return rows


def fuzz_kills(tmp: Path, kills: int, per_run: int, seed: int) -> dict:
    from tests.e2e.test_kill_resume import kill_and_resume, kill_config, run_to_end, same_result
    from tests.integration._train_utils import tiny_pipeline

    config = tmp / "kill.yaml"
    config.write_text(yaml.safe_dump(kill_config(tiny_pipeline(tmp))))
    clean = tmp / "clean"
    t0 = time.monotonic()
    assert run_to_end(config, clean).returncode == 0
    wall = time.monotonic() - t0
    rng = random.Random(seed)
    landed = in_write = 0
    failures = []
    k = 0
    while landed < kills:
        run = tmp / f"killed{k}"
        report = kill_and_resume(config, run, [rng.uniform(0.05, 1.0) * wall for _ in range(per_run)])
        landed += report["landed"]
        in_write += report["in_write"]
        problems = same_result(clean, run) if report["returncode"] == 0 else [f"exit {report['returncode']}"]
        if problems:
            failures.append({"run": k, "problems": problems, "stderr": report["stderr"][-500:]})
        shutil.rmtree(run, ignore_errors=True)
        k += 1
    return {"clean_wall_s": round(wall, 1), "runs": k, "kills": landed, "kills_during_a_write": in_write,
            "non_resumable": len(failures), "failures": failures}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kills", type=int, default=30)
    p.add_argument("--kills-per-run", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-kills", action="store_true")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="gfnalign-fuzz-"))
    try:
        t0 = time.monotonic()
        rows = fuzz_configs(tmp) + fuzz_eval_sample(tmp)
        summary = {k: sum(r["outcome"] == k for r in rows) for k in ("named", "accepted", "traceback")}
        print(f"bad inputs: {len(rows)} ({summary}); {time.monotonic() - t0:.0f} s")
        for r in rows:
            if r["outcome"] == "traceback":
                print(f"  TRACEBACK {r['input']}: {r['message']}")
        result = {"inputs": len(rows), **summary, "accepted_inputs": [r["input"] for r in rows
                                                                       if r["outcome"] == "accepted"],
                  "tracebacks": [r for r in rows if r["outcome"] == "traceback"]}
        if not args.skip_kills:
            t0 = time.monotonic()
            kills = fuzz_kills(tmp, args.kills, args.kills_per_run, args.seed)
            print(f"kills: {kills['kills']} over {kills['runs']} runs ({kills['kills_during_a_write']} during a "
                  f"checkpoint/export write), non-resumable: {kills['non_resumable']}; {time.monotonic() - t0:.0f} s")
            result["kills"] = kills
        if args.json:
            args.json.write_text(json.dumps(result, indent=1))
        return 0 if not result["tracebacks"] and not result.get("kills", {}).get("non_resumable") else 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
