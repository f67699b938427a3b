"""What `backprop train --print-launch` prints: how the job runs on several processes, GPUs and machines.

- the torchrun line the job's worker runs on this machine once the governor admits the job;
- for several machines, the `backprop train` command for each (the same options, its own --node-rank);
- a Slurm sbatch script: one task per node, each running that `backprop train`, the rendezvous on the first node.
"""

from __future__ import annotations

import argparse
import shlex

from training.config import Settings

DEFAULT_PORT = 29500  # the usual torchrun rendezvous port, shown when --master-port is not given
# Set per machine below, or meaningless in a batch job (--detach would end the Slurm task while the job runs).
PER_MACHINE = ("nproc", "nnodes", "node_rank", "master_addr", "master_port", "print_launch", "detach")


def launch_text(settings: Settings, parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    from training.distributed import torchrun_command

    d = settings.distributed
    port = d.master_port or DEFAULT_PORT
    options = same_options(parser, args)
    torchrun = torchrun_command(settings, "RUN_DIR", port=port)
    lines = [
        f"# This machine (node rank {d.node_rank} of {d.nnodes}): `backprop train` with these options queues the job; "
        "once the governor admits it, its worker runs",
        shlex.join(torchrun),
        "# (RUN_DIR: the run's folder; on one machine without --master-port the job takes a free port)",
        "",
    ]
    if d.nnodes > 1:
        lines.append(f"# The same command on each of the {d.nnodes} machines, machine 0 at {d.master_addr}:{port}:")
        for rank in range(d.nnodes):
            machine = ["--nproc", str(d.nproc), "--nnodes", str(d.nnodes), "--node-rank", str(rank),
                       "--master-addr", d.master_addr, "--master-port", str(port)]  # fmt: skip
            lines.append(shlex.join(["backprop", "train", *options, *machine]))
        lines.append("")
    lines += ["# Slurm: save what follows as backprop.sbatch and run `sbatch backprop.sbatch`", sbatch_script(settings, options)]
    return "\n".join(lines)


def sbatch_script(settings: Settings, options: list[str]) -> str:
    """One Slurm task per node; each runs `backprop train`, whose worker starts torchrun with the rendezvous on the
    allocation's first node (its hostname, from scontrol)."""
    d = settings.distributed
    gpus = f"#SBATCH --gpus-per-node={d.nproc}" if d.nproc != "auto" else "#SBATCH --exclusive  # --nproc auto: every GPU"
    per_node = (
        f'{shlex.join(["backprop", "train", *options])} --nproc {d.nproc} --nnodes "$SLURM_NNODES" '
        '--node-rank "$SLURM_NODEID" --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT"'
    )
    return "\n".join([
        "#!/bin/bash",
        "#SBATCH --job-name=backprop",
        f"#SBATCH --nodes={d.nnodes}",
        "#SBATCH --ntasks-per-node=1",
        gpus,
        "#SBATCH --output=backprop-%j.log",
        "set -euo pipefail",
        "# The rendezvous: the first node of the allocation",
        'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)',  # sed reads on: no SIGPIPE under pipefail
        f"MASTER_PORT={d.master_port or DEFAULT_PORT}",
        "export MASTER_ADDR MASTER_PORT",
        "# One task per node: its `backprop train` starts torchrun there (one process per GPU) and trains with the others",
        f"srun --kill-on-bad-exit=1 bash -c {shlex.quote(per_node)}",
        "",
    ])  # fmt: skip


def same_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    """The command line's options back as flags (those set per machine left out), long spelling, in the parser's order."""
    flags: list[str] = []
    for action in parser._actions:
        if not action.option_strings or action.dest in (*PER_MACHINE, "help", "verbose"):
            continue
        value = getattr(args, action.dest, None)
        if value is None or value == action.default:
            continue
        flag = next((s for s in action.option_strings if s.startswith("--")), action.option_strings[0])
        if isinstance(action, argparse.BooleanOptionalAction):
            flags.append(flag if value else f"--no-{flag[2:]}")
        elif isinstance(value, bool):
            flags += [flag] if value else []
        else:
            for item in value if isinstance(value, list) else [value]:
                flags += [flag, str(item)]
    return flags
