"""One update per method at Stable Diffusion 1.5 size on the CPU: peak RSS and network rows per transition.

    python benchmarks/full_size_cpu.py [--methods residual-nabla-db,...] [--resolution 512] [--steps 4]
                                       [--batch 1] [--fraction 0.5] [--rss-limit-gb 18] [--threads 2]
                                       [--trace] [--json benchmarks/out/full_size_cpu.json]

Components as in ``gpu_sd15.py`` (nothing downloaded): the SD1.5 UNet, f8 VAE and CLIP ViT-L/14 text encoder
built from their real config values with random weights, and the aesthetic reward's compute (a random CLIP
ViT-L/14 vision tower and the LAION head); LoRA rank 4, fp32, classifier-free guidance 7.5, lookahead cached
with the default x̂0 model. ``--resolution`` sets the image size (latents are resolution/8); the networks
do not change.

Per method, in its own subprocess (so ``ru_maxrss`` is that method's peak): one sampling epoch of ``--batch``
trajectories (rollout, terminal reward, the cached lookahead), then **one optimiser update** on the first
micro-batch of the selected transitions (``--micro-batch``, default: all of them). Reported: seconds for the
epoch's sampling and for the update, peak RSS, and the rows each network processed per trained transition in
the update (counted by forward hooks, as in ``throughput.py``: a CFG pass is 2 UNet rows).

**Memory guard.** A watchdog thread in every subprocess reads its own RSS every 0.1 s and kills the process
(exit code 137, recorded as ``"error": "RSS limit"``) once it exceeds ``--rss-limit-gb`` (default 18), so a
run on a shared machine never drives it into the out-of-memory killer. Start with ``--resolution 256``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
METHODS = ("dag-db", "dag-kl", "nabla-db", "residual-nabla-db", "ddpo", "reward-backprop", "rtb", "grpo")
KILLED = 137


def rss_bytes() -> int:
    """This process's resident set size (Linux /proc; psutil elsewhere)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import psutil

        return int(psutil.Process().memory_info().rss)


def start_watchdog(limit_bytes: int, interval_s: float = 0.1) -> None:
    """Kill this process when its RSS exceeds ``limit_bytes`` (before the kernel's OOM killer picks a victim)."""

    def watch() -> None:
        while True:
            rss = rss_bytes()
            if rss > limit_bytes:
                print(f"full_size_cpu: RSS {rss / 2**30:.2f} GB exceeds the limit {limit_bytes / 2**30:.2f} GB; "
                      "killing this run", file=sys.stderr, flush=True)
                os._exit(KILLED)
            time.sleep(interval_s)

    threading.Thread(target=watch, name="rss-watchdog", daemon=True).start()


def phase(name: str) -> None:
    """Say on stderr which phase starts (a run the watchdog kills reports the phase it was in)."""
    print(f"full_size_cpu: phase {name} (peak RSS so far {peak_rss_gb():.2f} GB)", file=sys.stderr, flush=True)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def malloc_in_use_gb() -> float | None:
    """Bytes glibc's allocator has handed out and not taken back (heap + mmapped chunks), or None off glibc:
    the live allocations, where RSS also counts freed heap memory not yet returned to the system."""
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                   "fsmblks", "uordblks", "fordblks", "keepcost")]

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = MallInfo2
    except (OSError, AttributeError):
        return None
    info = libc.mallinfo2()
    return (info.uordblks + info.hblkhd) / 2**30


def trace_objective_phases() -> None:
    """``--trace``: after each network pass, VJP and Lookahead call inside the objectives and the memory probe,
    print RSS, the allocator's live bytes and the peak so far (where a transition's memory goes)."""
    import functools

    from gfnalign.objectives import residual_nabla_db, score_balance
    from gfnalign.training import lookahead, memory

    t0 = time.perf_counter()

    def wrap(owner: Any, name: str, tag: str) -> None:
        fn = getattr(owner, name)

        @functools.wraps(fn)
        def traced(*a: Any, **k: Any) -> Any:
            out = fn(*a, **k)
            live = malloc_in_use_gb()
            print(f"full_size_cpu: trace {time.perf_counter() - t0:7.1f} s after {tag:<28} RSS {rss_bytes() / 2**30:6.2f} GB"
                  f"  live {'?' if live is None else f'{live:6.2f}'} GB  peak {peak_rss_gb():6.2f} GB",
                  file=sys.stderr, flush=True)
            return out

        static = isinstance(owner, type) and isinstance(owner.__dict__.get(name), staticmethod)
        setattr(owner, name, staticmethod(traced) if static else traced)

    wrap(score_balance.ScoreBalanceObjective, "policy_kernel", "network pass")
    wrap(score_balance.ScoreBalanceObjective, "flow_scores", "flow scores")
    wrap(score_balance.ScoreBalanceObjective, "shared_reward_grad", "shared x0 VJP")
    wrap(score_balance, "reverse_score", "reverse-score VJP")
    wrap(residual_nabla_db, "mean_vjp", "mean VJP")
    wrap(lookahead.RewardLookahead, "grad_log_reward_x0", "decoder + reward backward")
    wrap(memory, "update_rows", "memory probe")
    import torch

    wrap(torch.Tensor, "backward", "loss backward")


def run_one(args: argparse.Namespace) -> dict[str, Any]:
    """Build the SD1.5-size world, sample one epoch and make one update of ``args.methods`` (a single method)."""
    import torch

    torch.set_num_threads(args.threads)
    from gpu_sd15 import build_components, build_reward, method_config
    from throughput import Harness

    from gfnalign.backbones.sd import StableDiffusionBackbone
    from gfnalign.training.memory import MemoryBudget, parts, resident_modules, update_need, update_rows

    method = args.methods
    device = torch.device("cpu")
    t0 = time.perf_counter()
    comps = build_components(tiny=args.tiny)
    backbone = StableDiffusionBackbone(
        **comps, num_inference_steps=args.steps, guidance_scale=args.guidance, eta=1.0, dtype="float32",
        device=device, lora_rank=4, lora_alpha=4.0, image_size=args.resolution,
        gradient_checkpointing=args.gradient_checkpointing,
    )
    reward = build_reward(args.tiny, device)
    cfg = method_config(method, args.batch, args.steps, args.fraction)
    cfg["training"]["micro_batch"] = args.micro_batch or 10**6
    h = Harness(cfg, device, backbone=backbone, reward=reward)
    build_s = time.perf_counter() - t0
    rss_built = peak_rss_gb()
    phase("sample")

    t0 = time.perf_counter()
    traj = h.sample(args.batch)
    sample_s = time.perf_counter() - t0
    rows_sample = h.probe.snapshot()
    h.probe.reset()
    rss_sampled = peak_rss_gb()
    phase("update")

    t0 = time.perf_counter()
    batch = h.objective.select_transitions(traj, h.generator)
    n = min(len(batch), cfg["training"]["micro_batch"])
    mb = batch.index(torch.arange(n))

    def loss_of(part: Any) -> Any:
        return h.objective(part, h.backbone, h.lookahead, beta=h.cfg.beta.value).loss

    # as the trainer: the micro-batch is backpropagated in parts that fit the memory budget
    budget = getattr(h.lookahead, "memory", None) or MemoryBudget(None)
    resident = resident_modules(h.backbone, h.objective, reward)
    phase("update probe")  # the trainer's one-transition measurement
    part_rows = update_rows(h.objective, mb, loss_of, budget, resident, backbone=h.backbone)
    need = update_need(h.objective, mb, loss_of, budget, resident, part_rows, backbone=h.backbone)
    checkpointing = need > budget.budget_bytes and h.backbone.enable_gradient_checkpointing()  # as the trainer
    if checkpointing:
        part_rows = update_rows(h.objective, mb, loss_of, budget, resident, backbone=h.backbone)
    phase(f"update parts (denoiser checkpointing {'on' if checkpointing else 'off'})")
    losses = []
    for part in parts(mb, part_rows):
        loss = loss_of(part) * (len(part) / n)
        loss.backward()
        losses.append(float(loss.detach()))
        del loss
    h.optimizer.step()
    h.optimizer.zero_grad(set_to_none=True)
    update_s = time.perf_counter() - t0
    rows = h.probe.snapshot()
    per_transition = {k: (c["grad"] + c["nograd"]) / n for k, c in rows.items()}
    return {
        "method": method, "resolution": args.resolution, "steps": args.steps, "batch": args.batch,
        "transitions": n, "terminal_transitions": int(mb.is_last.sum()), "build_s": build_s,
        "sample_s": sample_s, "update_s": update_s, "loss": sum(losses),
        "update_part_transitions": min(part_rows, n), "memory": budget.describe(),
        "denoiser_checkpointing": bool(checkpointing),
        "rows_per_transition": per_transition,
        "rows_sample": {k: c["grad"] + c["nograd"] for k, c in rows_sample.items()},
        "peak_rss_gb": peak_rss_gb(), "rss_after_build_gb": rss_built,
        "gradient_checkpointing_from_start": args.gradient_checkpointing, "peak_rss_after_sample_gb": rss_sampled,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--resolution", type=int, default=512, help="image size in pixels (latents: /8)")
    p.add_argument("--steps", type=int, default=4, help="sampling steps per trajectory")
    p.add_argument("--batch", type=int, default=1, help="trajectories sampled")
    p.add_argument("--fraction", type=float, default=0.5, help="fraction of transitions selected for training")
    p.add_argument("--micro-batch", type=int, default=0, help="transitions in the one update (0: all selected)")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--rss-limit-gb", type=float, default=18.0, help="the watchdog kills a run above this RSS")
    p.add_argument("--tiny", action="store_true", help="tiny components (smoke test of this script)")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="the denoiser recomputes its blocks in the backward from the start (backbone.gradient_checkpointing)")
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "out" / "full_size_cpu.json")
    p.add_argument("--trace", action="store_true",
                   help="print RSS and live allocator bytes after each pass inside the objective (stderr)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child:  # one method, guarded; the result is the last stdout line
        start_watchdog(int(args.rss_limit_gb * 2**30))
        if args.trace:
            trace_objective_phases()
        print(json.dumps(run_one(args)), flush=True)
        return 0

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        print(f"full_size_cpu: --methods has unknown {unknown}; choose from {', '.join(METHODS)}")
        return 2
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    rows = []
    for m in methods:  # one at a time: each method's peak is its own
        cmd = [sys.executable, __file__, "--child", "--methods", m, "--resolution", str(args.resolution),
               "--steps", str(args.steps), "--batch", str(args.batch), "--fraction", str(args.fraction),
               "--micro-batch", str(args.micro_batch), "--guidance", str(args.guidance),
               "--threads", str(args.threads), "--rss-limit-gb", str(args.rss_limit_gb)]
        if args.tiny:
            cmd.append("--tiny")
        if args.gradient_checkpointing:
            cmd.append("--gradient-checkpointing")
        if args.trace:
            cmd.append("--trace")
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode == 0:
            row = json.loads(proc.stdout.strip().splitlines()[-1])
        else:
            phases = [ln for ln in proc.stderr.splitlines() if ln.startswith("full_size_cpu: phase")]
            where = f" in {phases[-1].removeprefix('full_size_cpu: ')}" if phases else ""
            err = (f"RSS limit{where}" if proc.returncode == KILLED
                   else f"exit {proc.returncode}: {proc.stderr.strip()[-400:]}")
            row = {"method": m, "resolution": args.resolution, "error": err}
        row["wall_s"] = time.perf_counter() - t0
        rows.append(row)
        print(json.dumps(row), flush=True)
    meta = {"command": " ".join(["python", "benchmarks/full_size_cpu.py", *(argv if argv is not None else sys.argv[1:])]),
            "machine": f"{platform.machine()} {os.cpu_count()} cores", "rss_limit_gb": args.rss_limit_gb}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(args.json.read_text()) if args.json.is_file() else {"runs": []}
    old["runs"].append({"meta": meta, "rows": rows})
    args.json.write_text(json.dumps(old, indent=2) + "\n")
    print("| method | px | peak RSS GB | update s | sampling s | UNet / decoder / reward rows per transition |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['method']} | {r['resolution']} | {r['error'][:60]} | | | |")
            continue
        c = r["rows_per_transition"]
        print(f"| {r['method']} | {r['resolution']} | {r['peak_rss_gb']:.2f} | {r['update_s']:.1f} | "
              f"{r['sample_s']:.1f} | {c.get('unet', 0):.2f} / {c.get('decoder', 0):.2f} / {c.get('reward', 0):.2f} |")
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
