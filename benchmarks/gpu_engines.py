"""accelerate's engines (DDP, FSDP, DeepSpeed ZeRO-2/3) under the real trainer: correctness checks, then peak
memory and step time per engine and model size.

    python benchmarks/gpu_engines.py check [--engines ddp,fsdp,deepspeed_zero2,deepspeed_zero3] [--cpu]
    python benchmarks/gpu_engines.py bench [--engines ...] [--sizes sd15,2.5b,12b] [--gpus 8] [--full-finetune]
                                           [--updates 4] [--json benchmarks/out/gpu_engines.json]

``check`` (two processes, the tiny random digits-architecture pipeline of the tests), per engine:

1. *equivalence*: ``tests/e2e/_engine_worker.py`` (three dag-db updates with a target network, two of them
   accumulating two micro-batches) on one process with the doubled batch, and under the engine with each
   rank holding one half; reported: max |Δw| over all trainable tensors and the objective's state (the CPU
   DDP test asserts < 1e-5), and the same for one half alone (what no gradient averaging would give);
2. *resume*: ``gfnalign train`` stopped after one update (a mid-epoch checkpoint), resumed with
   ``--resume latest`` to the end, against an uninterrupted run (max |Δw|); ``final/`` must load with
   diffusers' ``load_lora_weights``.

``bench``: a random-weight UNet (nothing is downloaded) of SD1.5's architecture at ``sd15`` (0.86 B
parameters), widened to ≈2.5 B (``2.5b``, SD3.5-Medium's parameter count) or ≈12 B (``12b``, FLUX.1's) —
memory and step time follow the parameter count and activation size, not the block type; the SD3/FLUX
backbones themselves are not part of gfnalign yet. dag-db, the cheap ``ink`` reward (so the engine, not the
reward, is measured), bf16, 512 px, batch 2 per GPU; LoRA rank 4 by default, ``--full-finetune`` trains
every UNet weight. Per engine: seconds per update and peak memory of rank 0 from ``metrics.jsonl``
(``perf/update_s`` median, ``perf/peak_mem_mb`` max), or the out-of-memory / error line.

``--cpu`` runs the CPU-capable engines here (DDP on gloo; DeepSpeed needs ``pip install deepspeed``; FSDP
through accelerate needs an accelerator). Engine configs: ``configs/accelerate/<engine>.yaml``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
ENGINES = ("ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3")
# UNet widths: SD1.5's (320, 640, 1280, 1280) and the same architecture widened to the target parameter count
SIZES = {"sd15": 320, "2.5b": 544, "12b": 1216}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _env(cpu: bool) -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1",
               TOKENIZERS_PARALLELISM="false", OMP_WAIT_POLICY="PASSIVE")
    paths = [str(ROOT / "src"), str(ROOT), str(ROOT / "benchmarks")]
    env["PYTHONPATH"] = os.pathsep.join(paths + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    if cpu:
        env["OMP_NUM_THREADS"] = "1"
    return env


def launch(engine: str, nproc: int, args: list[str], *, cpu: bool, timeout: int = 3600) -> subprocess.CompletedProcess:
    """``accelerate launch --config_file configs/accelerate/<engine>.yaml --num_processes N -m ...``."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "configs" / "accelerate" / f"{engine}.yaml"), "--num_processes", str(nproc),
           "--main_process_port", str(_free_port())]
    # no --cpu: with it accelerate launch starts one process (several only through mpirun); on a machine
    # without GPUs the trainer's Accelerator picks the CPU and gloo by itself
    return subprocess.run(cmd + args, capture_output=True, text=True, timeout=timeout, env=_env(cpu), cwd=ROOT)


def _python(args: list[str], *, cpu: bool, timeout: int = 1800) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout,
                          env=_env(cpu), cwd=ROOT)


def _tail(out: subprocess.CompletedProcess, n: int = 1500) -> str:
    return (out.stderr or out.stdout)[-n:]


def _max_diff(a: dict[str, Any], b: dict[str, Any]) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def _trainable(run: Path) -> dict[str, Any]:
    """The last checkpoint's trainable tensors (replicated engines) or the exported final/ weights."""
    import torch

    from gfnalign.training.checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(run / "checkpoints")
    if ckpt is not None and (ckpt / "trainable.pt").is_file():
        return {f"policy.{k}": v for k, v in torch.load(ckpt / "trainable.pt").items()}
    from safetensors.torch import load_file

    return load_file(str(run / "final" / "pytorch_lora_weights.safetensors"))


def check(engine: str, work: Path, cpu: bool) -> dict[str, Any]:
    import torch
    import yaml

    from tests.integration._train_utils import tiny_config, tiny_pipeline

    pipe = tiny_pipeline(work)
    res: dict[str, Any] = {"engine": engine}
    worker = ["-m", "tests.e2e._engine_worker", str(pipe)]
    single = work / "single.pt"
    if not single.is_file():
        for rows, path in (("all", single), ("half0", work / "half.pt")):
            out = _python([*worker, str(path), "--rows", rows], cpu=cpu)
            if out.returncode:
                return {**res, "error": f"single-process worker failed: {_tail(out)}"}
    out = launch(engine, 2, [*worker, str(work / f"{engine}.pt"), "--rows", "rank"], cpu=cpu)
    if out.returncode:
        return {**res, "error": f"engine worker failed: {_tail(out)}"}
    a, b, h = (torch.load(p) for p in (single, work / f"{engine}.pt", work / "half.pt"))
    res.update(wrapper=b["engine"], equivalence_max_abs_diff=_max_diff(b["state"], a["state"]),
               one_half_alone_max_abs_diff=_max_diff(h["state"], a["state"]))

    cfg = tiny_config(pipe, "dag-db", {"fraction": 0.5, "flow_gradient": "target"},
                      sampling={"num_steps": 4, "guidance_scale": 1.0, "batch_size": 4, "batches_per_epoch": 1},
                      training={"epochs": 2, "micro_batch": 2, "grad_accum": 2, "max_updates_per_epoch": 2})
    config = work / f"{engine}-cfg.yaml"
    config.write_text(yaml.safe_dump(cfg))
    train = ["-m", "gfnalign", "train", "--config", str(config)]
    for name, extra in (("clean", []), ("resumed", ["--stop-after-updates", "1"]), ("resumed", ["--resume", "latest"])):
        out = launch(engine, 2, [*train, "--out", str(work / f"{engine}-{name}"), *extra], cpu=cpu)
        if out.returncode:
            return {**res, "error": f"train {name} {' '.join(extra)} failed: {_tail(out)}"}
    res["resume_max_abs_diff"] = _max_diff(_trainable(work / f"{engine}-resumed"), _trainable(work / f"{engine}-clean"))
    ckpts = sorted((work / f"{engine}-resumed" / "checkpoints").glob("step_*"))
    res["checkpoint_files"] = sorted(p.name for p in ckpts[-1].iterdir()) if ckpts else []
    loader = ("from diffusers import StableDiffusionPipeline as P; import sys; "
              "p = P.from_pretrained(sys.argv[1]); p.load_lora_weights(sys.argv[2]); print('loaded')")
    out = _python(["-c", loader, str(pipe), str(work / f"{engine}-resumed" / "final")], cpu=True)
    res["final_loads_in_diffusers"] = out.returncode == 0 and "loaded" in out.stdout
    return res


def random_backbone(**kwargs: Any) -> Any:
    """``backbone.kind: python`` entry point for ``bench``: a random SD1.5-architecture backbone whose UNet
    width comes from ``GPU_ENGINES_WIDTH``."""
    import torch
    from diffusers import UNet2DConditionModel
    from gpu_sd15 import build_components

    from gfnalign.backbones.sd import StableDiffusionBackbone

    width = int(os.environ.get("GPU_ENGINES_WIDTH", "320"))
    comps = build_components(tiny=False)
    with torch.device(kwargs.get("device", "cpu")):  # built where it runs: 12 B float32 weights are 48 GB
        comps["unet"] = UNet2DConditionModel(
            sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(width, 2 * width, 4 * width, 4 * width),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32)
    return StableDiffusionBackbone(**comps, **kwargs)


def bench(engine: str, size: str, gpus: int, full: bool, updates: int, work: Path) -> dict[str, Any]:
    import yaml

    cfg = {
        "run_name": f"bench-{engine}-{size}", "seed": 0,
        "backbone": {"kind": "python", "path": "gpu_engines:random_backbone", "dtype": "bfloat16",
                     "lora_rank": 0 if full else 4, "lora_alpha": 4.0, "full_finetune": full},
        "reward": "ink", "prompts": "animals",
        "method": {"name": "dag-db", "options": {"fraction": 0.25}},
        "lookahead": {"mode": "cached", "model": "policy"},
        "sampling": {"num_steps": 8, "guidance_scale": 7.5, "batch_size": 2, "batches_per_epoch": 1},
        "training": {"epochs": 1, "micro_batch": 2, "grad_accum": 1, "max_updates_per_epoch": updates,
                     "mixed_precision": "bf16"},
        "logging": {"report": False, "tensorboard": False, "progress": False, "sample_every": 0,
                    "checkpoint_every": 1},
    }
    config = work / f"bench-{engine}-{size}.yaml"
    config.write_text(yaml.safe_dump(cfg))
    run = work / f"bench-{engine}-{size}"
    shutil.rmtree(run, ignore_errors=True)
    os.environ["GPU_ENGINES_WIDTH"] = str(SIZES[size])
    out = launch(engine, gpus, ["-m", "gfnalign", "train", "--config", str(config), "--out", str(run)], cpu=False)
    res: dict[str, Any] = {"engine": engine, "size": size, "gpus": gpus, "full_finetune": full}
    if out.returncode:
        err = _tail(out, 600)
        res["error"] = "out of memory" if "out of memory" in err.lower() else err
        return res
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    times = [r["perf/update_s"] for r in rows[1:]] or [r["perf/update_s"] for r in rows]
    res.update(update_s_median=statistics.median(times), peak_mem_mb=max(r["perf/peak_mem_mb"] for r in rows),
               updates=len(rows))
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("mode", choices=("check", "bench"))
    ap.add_argument("--engines", default=",".join(ENGINES))
    ap.add_argument("--sizes", default="sd15,2.5b,12b")
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--full-finetune", action="store_true")
    ap.add_argument("--updates", type=int, default=4)
    ap.add_argument("--cpu", action="store_true", help="check: run on CPU (gloo); only DDP and DeepSpeed can")
    ap.add_argument("--json", default=None)
    ap.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    args = ap.parse_args(argv)
    import torch

    if not args.cpu and not torch.cuda.is_available():
        print("gpu_engines: CUDA is not available on this machine; run `check --cpu --engines ddp` here, "
              "the rest on a GPU machine", file=sys.stderr)
        return 2
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="gpu_engines-"))
    work.mkdir(parents=True, exist_ok=True)
    results = []
    for engine in args.engines.split(","):
        if args.mode == "check":
            results.append(check(engine, work, args.cpu))
        else:
            for size in args.sizes.split(","):
                results.append(bench(engine, size, args.gpus, args.full_finetune, args.updates, work))
        print(json.dumps(results[-1]), flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
