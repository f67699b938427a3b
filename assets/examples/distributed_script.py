"""A small torch.distributed training script that speaks Backprop's job protocol on every rank.

    backprop run assets/examples/distributed_script.py --nproc 2 --name sine-ddp -- --steps 3000

Backprop starts it under torchrun (one process a rank; gloo on CPU, NCCL on GPUs) with the arguments of any script run:
`--run-id ID --max-minutes N [--checkpoint-every-seconds S] [--resume-from PATH] [your args]`. Each rank learns
y = sin(x) on its own samples with a DistributedDataParallel MLP (the gradients are all-reduced at every step); rank 0
alone prints the JSON messages and writes the checkpoints. A stop (SIGINT, which torchrun passes to every rank) or the
time box is all-reduced too, so every rank stops at the same step and one checkpoint holds them all.
Without Backprop: `torchrun --nproc-per-node 2 distributed_script.py --steps 500`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


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
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")

    def say(**message: object) -> None:
        if rank == 0:
            print(json.dumps(message), flush=True)

    torch.manual_seed(0)  # the same initial weights on every rank
    model = DistributedDataParallel(
        torch.nn.Sequential(torch.nn.Linear(1, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1)).to(device)
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    step = 0
    if args.resume_from:
        state = torch.load(args.resume_from, map_location=device)
        model.module.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
        if rank == 0:
            print(f"resumed from {args.resume_from} at step {step}", flush=True)  # a plain line: kept in the log

    out_dir = Path(os.environ.get("BACKPROP_RUN_DIR", f"runs/{args.run_id}")) / "checkpoints"
    deadline = time.monotonic() + args.max_minutes * 60 if args.max_minutes else None
    last_save = time.monotonic()

    def save() -> None:
        if rank != 0:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"step_{step}.pt"
        state = {"model": model.module.state_dict(), "optimizer": optimizer.state_dict(), "step": step}
        torch.save(state, path.with_suffix(".tmp"))
        os.replace(path.with_suffix(".tmp"), path)  # atomic: a crash never leaves half a checkpoint
        say(event="checkpoint_saved", path=str(path), step=step)

    say(event="started", max_steps=args.steps, world_size=world)
    first_step = step
    generator = torch.Generator().manual_seed(step * world + rank)  # each rank its own samples
    while step < args.steps:
        # Stop and time box are decided together: any rank's request stops every rank at this same step.
        timed_out = deadline is not None and time.monotonic() >= deadline and step > first_step
        flags = torch.tensor([float(stop_requested), float(timed_out)], device=device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        if flags.any():
            save()
            if flags[1] and not flags[0]:
                say(event="timeboxed")
            dist.barrier()
            dist.destroy_process_group()
            return 0
        x = (torch.rand(64, 1, generator=generator) * 6.28 - 3.14).to(device)
        loss = torch.nn.functional.mse_loss(model(x), torch.sin(x))
        optimizer.zero_grad()
        loss.backward()  # DDP all-reduces the gradients here
        optimizer.step()
        step += 1
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        if step % args.log_every == 0 or step == args.steps:
            say(step=step, loss=round(mean_loss.item() / world, 6), world_size=world)
        if time.monotonic() - last_save >= args.checkpoint_every_seconds:
            save()
            last_save = time.monotonic()
    save()
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
