"""``gfnalign rewards list`` and ``gfnalign rewards serve --reward NAME --port P``."""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="rewards_command", metavar="{list,serve}")
    p_list = sub.add_parser("list", help="every reward with its inputs and whether it is differentiable")
    p_list.add_argument("--json", action="store_true", help="print JSON rows instead of a table")

    p_serve = sub.add_parser(
        "serve", help="serve a reward over HTTP (POST /score; see docs/rewards.md for the wire format)"
    )
    p_serve.add_argument(
        "--reward", required=True,
        help="a reward name, 'package.module:function', or a JSON object such as "
        "'{\"name\": \"aesthetic\", \"head_path\": \"head.pth\"}'",
    )
    p_serve.add_argument(
        "--option", "-o", action="append", default=[], metavar="KEY=VALUE",
        help="reward option (value parsed as YAML: numbers, true/false, lists); repeatable",
    )
    p_serve.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    p_serve.add_argument("--port", type=int, default=8765, help="port (0 picks a free one; default 8765)")
    p_serve.add_argument("--device", default=None, help="device for the reward (default: cpu)")
    p_serve.add_argument("--max-body-mb", type=float, default=512, help="largest accepted request body")
    p_serve.add_argument("--verbose", action="store_true", help="log every request")
    p_serve.add_argument("--token", default=None,
                         help="shared secret clients must send as 'Authorization: Bearer TOKEN' (default: "
                              "$GFNALIGN_REWARD_TOKEN; required when --host is not loopback)")
    p_serve.add_argument("--max-concurrent", type=int, default=4,
                         help="requests handled at once; more get 503 (the client retries)")
    p_serve.add_argument("--read-timeout", type=float, default=30.0,
                         help="seconds a client may stay silent mid-request (or idle on a kept connection)")


def _reward_spec(args: argparse.Namespace):
    import yaml

    text = args.reward.strip()
    if text.startswith("{"):
        try:
            spec = json.loads(text)
        except json.JSONDecodeError as err:
            raise SystemExit(f"--reward: not valid JSON ({err}): {text!r}") from None
    else:
        spec = {"name": text}
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--option expects KEY=VALUE, got {item!r}")
        spec[key.strip()] = yaml.safe_load(value)
    if args.device is not None:
        spec["device"] = args.device
    return spec


def _differentiable_text(info) -> str:
    if info.name == "composite":
        return "if all parts"
    return "yes" if info.differentiable else "no"


def run(args: argparse.Namespace) -> int:
    command = getattr(args, "rewards_command", None)
    if command == "list":
        from gfnalign.rewards import list_rewards

        rows = list_rewards()
        if args.json:
            print(json.dumps([
                {"name": r.name, "differentiable": r.differentiable if r.name != "composite" else "if all components",
                 "inputs": r.inputs, "needs_weights": r.needs_weights, "extra": r.extra,
                 "options": r.options, "description": r.description} for r in rows
            ], indent=2))
            return 0
        header = ("name", "differentiable", "inputs", "weights", "extra", "description")
        table = [header] + [
            (r.name, _differentiable_text(r), r.inputs, "yes" if r.needs_weights else "no", r.extra or "-",
             r.description) for r in rows
        ]
        widths = [max(len(row[i]) for row in table) for i in range(len(header) - 1)]
        for row in table:
            print("  ".join(cell.ljust(w) for cell, w in zip(row[:-1], widths)) + "  " + row[-1])
        print("\nAlso: any 'package.module:function' f(images, prompts) -> scores (non-differentiable unless "
              "differentiable: true).")
        return 0
    if command == "serve":
        import os

        from gfnalign.rewards.http import is_loopback, make_reward_server

        spec = _reward_spec(args)
        token = args.token or os.environ.get("GFNALIGN_REWARD_TOKEN") or None
        if not is_loopback(args.host) and not token:
            print(f"error: --host {args.host} is reachable from other machines; give a shared secret with --token "
                  "or GFNALIGN_REWARD_TOKEN (clients send it as the http reward's token option)", file=sys.stderr)
            return 2
        if args.max_concurrent < 1 or not args.read_timeout > 0 or not args.max_body_mb > 0:
            print("error: --max-concurrent must be >= 1, --read-timeout and --max-body-mb > 0", file=sys.stderr)
            return 2
        try:
            server = make_reward_server(
                spec, args.host, args.port, max_body_mb=args.max_body_mb, verbose=args.verbose, token=token,
                max_concurrent=args.max_concurrent, read_timeout=args.read_timeout,
            )
        except (ValueError, TypeError, OSError, ImportError) as err:  # bad spec, missing file/package, port in use
            print(f"error: {err}", file=sys.stderr)
            return 2
        reward = server.reward
        print(f"serving reward '{reward.name}' (inputs {reward.inputs}) at {server.url}  (Ctrl-C stops)", flush=True)
        try:
            server.serve_forever(poll_interval=0.2)
        except KeyboardInterrupt:
            pass
        finally:
            server.server_close()
        return 0
    print("usage: gfnalign rewards {list,serve} ... (see gfnalign rewards --help)", file=sys.stderr)
    return 2
