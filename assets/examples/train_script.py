"""A small, real PyTorch training script that speaks Backprop's job protocol.

    backprop run assets/examples/train_script.py --name sine -- --steps 3000

Backprop starts it as `python train_script.py --run-id ID --max-minutes N [--checkpoint-every-seconds S]
[--resume-from PATH] [your args]`. It learns y = sin(x) with a two-layer MLP and prints one JSON object per
line on stdout: {"step": N, "loss": x} as it trains, {"event": "checkpoint_saved", "path": ..., "step": N}
after each checkpoint, and {"event": "timeboxed"} when its time box ends it. On SIGINT (Backprop's graceful
stop) it saves a checkpoint and exits 0; `backprop resume` restarts it with --resume-from the last one.
Without Backprop it runs the same way: `python train_script.py --steps 500`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import time
from pathlib import Path

import torch


def say(**message: object) -> None:
    print(json.dumps(message), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run-id", default="local")
    parser.add_argument("--max-minutes", type=float, default=0, help="0: no time box")
    parser.add_argument("--checkpoint-every-seconds", type=float, default=30)
    parser.add_argument("--resume-from")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--lr", type=float, default=1e-2)
    args = parser.parse_args()

    stop_requested = False

    def on_sigint(signum: int, frame: object) -> None:
        nonlocal stop_requested
        stop_requested = True

    signal.signal(signal.SIGINT, on_sigint)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    step = 0
    if args.resume_from:
        state = torch.load(args.resume_from)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
        print(f"resumed from {args.resume_from} at step {step}", flush=True)  # a plain line: kept in the log

    out_dir = Path(os.environ.get("BACKPROP_RUN_DIR", f"runs/{args.run_id}")) / "checkpoints"
    out_dir.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.max_minutes * 60 if args.max_minutes else None
    last_save = time.monotonic()

    def save() -> None:
        path = out_dir / f"step_{step}.pt"
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step}, path.with_suffix(".tmp"))
        os.replace(path.with_suffix(".tmp"), path)  # atomic: a crash never leaves half a checkpoint
        say(event="checkpoint_saved", path=str(path), step=step)

    say(event="started", max_steps=args.steps)
    first_step = step
    generator = torch.Generator().manual_seed(step)
    while step < args.steps:
        if stop_requested:
            save()
            return 0
        if deadline is not None and time.monotonic() >= deadline and step > first_step:  # every session makes a step
            save()
            say(event="timeboxed")
            return 3
        x = torch.rand(256, 1, generator=generator) * 2 * math.pi
        loss = torch.nn.functional.mse_loss(model(x), torch.sin(x))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step += 1
        if step % args.log_every == 0 or step == args.steps:
            say(step=step, loss=round(loss.item(), 6))
        if time.monotonic() - last_save >= args.checkpoint_every_seconds:
            save()
            last_save = time.monotonic()
    save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
