"""The command line of several processes, GPUs and machines: --nproc, --strategy, --nnodes, --node-rank,
--master-addr, --master-port on train, multi-run and run, and `backprop train --print-launch` (the torchrun line and a
Slurm sbatch script, checked with bash itself)."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import DEMO_DATA, backprop, wait_for

from training.extras import installed
from training.runs import Registry


def launch(*args: str) -> tuple[list[str], str]:
    """`backprop train --print-launch ARGS`: (the torchrun line's arguments after the Python, the sbatch script)."""
    out = backprop("train", "--model", "demo", "--print-launch", *args, check=True).stdout
    torchrun = next(line for line in out.splitlines() if "torch.distributed.run" in line)
    return shlex.split(torchrun)[1:], out[out.index("#!/bin/bash") :]


def bash_syntax_ok(script: str, tmp_path: Path) -> None:
    path = tmp_path / "backprop.sbatch"
    path.write_text(script)
    checked = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr


def test_print_launch_on_one_machine_shows_the_torchrun_line_and_starts_nothing(home, tmp_path):
    torchrun, sbatch = launch("--nproc", "2", "--steps", "5")
    assert torchrun == ["-m", "torch.distributed.run", "--nproc-per-node", "2", "--nnodes", "1", "--node-rank", "0",
                        "--master-addr", "127.0.0.1", "--master-port", "29500", "--max-restarts", "0",
                        "-m", "training.rank", "RUN_DIR"]  # fmt: skip
    bash_syntax_ok(sbatch, tmp_path)
    assert "#SBATCH --nodes=1" in sbatch and "#SBATCH --gpus-per-node=2" in sbatch
    assert "backprop train --model demo --steps 5 --nproc 2 --nnodes" in sbatch
    assert Registry(home).list() == []  # printed, not queued


def test_print_launch_for_two_machines_gives_each_its_command_and_a_slurm_script_that_runs_them(home, tmp_path):
    torchrun, sbatch = launch("--nproc", "8", "--nnodes", "2", "--master-addr", "10.0.0.1", "--strategy", "fsdp",
                              "--lr", "0.001", "--no-packing")  # fmt: skip
    assert torchrun[torchrun.index("--nproc-per-node") :] == [
        "--nproc-per-node", "8", "--nnodes", "2", "--node-rank", "0", "--master-addr", "10.0.0.1",
        "--master-port", "29500", "--max-restarts", "0", "-m", "training.rank", "RUN_DIR",
    ]  # fmt: skip
    out = backprop("train", "--model", "demo", "--print-launch", "--nproc", "8", "--nnodes", "2", "--master-addr", "10.0.0.1",
                   check=True).stdout  # fmt: skip
    per_machine = [line for line in out.splitlines() if line.startswith("backprop train")]
    assert per_machine == [
        f"backprop train --model demo --nproc 8 --nnodes 2 --node-rank {rank} --master-addr 10.0.0.1 --master-port 29500"
        for rank in (0, 1)
    ]
    bash_syntax_ok(sbatch, tmp_path)
    assert "#SBATCH --nodes=2" in sbatch and "#SBATCH --gpus-per-node=8" in sbatch

    # Run the script as Slurm would on the second node, with stand-ins for scontrol, srun and backprop that record
    # what they are given: each node runs `backprop train` with the same options, its rank and the first node's name.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stubs = {
        "scontrol": 'printf "gpu-node-a\\ngpu-node-b\\n"',
        "srun": 'shift; "$@"',  # drop --kill-on-bad-exit=1, run the task here
        "backprop": f'printf "%s\\n" "$@" > {tmp_path / "argv"}',
    }
    for name, body in stubs.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "gpu-node-[a-b]",
           "SLURM_NNODES": "2", "SLURM_NODEID": "1"}  # fmt: skip
    (tmp_path / "backprop.sbatch").write_text(sbatch)
    subprocess.run(["bash", str(tmp_path / "backprop.sbatch")], env=env, check=True, cwd=tmp_path)
    assert (tmp_path / "argv").read_text().split("\n")[:-1] == [
        "train", "--model", "demo", "--lr", "0.001", "--no-packing", "--strategy", "fsdp", "--nproc", "8", "--nnodes", "2",
        "--node-rank", "1", "--master-addr", "gpu-node-a", "--master-port", "29500",
    ]  # fmt: skip


@pytest.fixture
def no_room(home, tmp_path, monkeypatch):
    """A simulated machine without free RAM: jobs stay queued, so what they were given can be read at leisure."""
    sensor = tmp_path / "sensor.json"
    sensor.write_text(json.dumps({"ram_available": 100}))
    monkeypatch.setenv("BACKPROPAGATE_TELEMETRY_FILE", str(sensor))


def queued_spec(home: Path, out: subprocess.CompletedProcess) -> dict:
    registry = Registry(home)
    run_id = out.stdout.strip().splitlines()[-1]
    wait_for(lambda: registry.get(run_id).reason, what="the job to wait for RAM")
    spec = json.loads((registry.get(run_id).path / "spec.json").read_text())
    backprop("stop", run_id, check=True)
    return spec["settings"]["distributed"]


def test_distributed_flags_reach_the_spec_of_train_multi_run_and_script_runs(home, no_room, tmp_path):
    flags = ["--nproc", "2", "--nnodes", "2", "--node-rank", "1", "--master-addr", "10.1.2.3", "--master-port", "29555"]
    train = backprop("train", "--model", "demo", "--strategy", "ddp", *flags, "--detach", check=True)
    assert queued_spec(home, train) | {"collective_timeout_s": None} == {
        "nproc": 2, "nnodes": 2, "node_rank": 1, "master_addr": "10.1.2.3", "master_port": 29555, "strategy": "ddp",
        "collective_timeout_s": None,
    }  # fmt: skip
    # A multi-run trains its runs on the GPUs of one machine: several machines are refused before anything is queued.
    multi = backprop("multi-run", "--model", "demo", "--data", str(DEMO_DATA), "--runs", "2", "--nproc", "auto", "--detach",
                     check=True)  # fmt: skip
    assert queued_spec(home, multi)["nproc"] == "auto"
    across = backprop("multi-run", "--model", "demo", "--data", str(DEMO_DATA), "--runs", "2", *flags, "--detach")
    assert across.returncode == 1 and "INPUT_INVALID_ARGUMENT" in across.stderr + across.stdout
    assert len(Registry(home).list()) == 2
    script = tmp_path / "noop.py"
    script.write_text("print('hello')\n")
    run = backprop("run", str(script), "--nproc", "2", "--detach", check=True)
    assert queued_spec(home, run)["nproc"] == 2


@pytest.mark.skipif(installed("deepspeed"), reason="deepspeed is installed here")
def test_a_deepspeed_strategy_without_the_dist_extra_is_dep_missing_before_any_job(home):
    out = backprop("train", "--model", "demo", "--nproc", "2", "--strategy", "deepspeed-zero3")
    assert out.returncode != 0 and "DEP_MISSING" in out.stderr and "backprop[dist]" in out.stderr
    assert Registry(home).list() == []


def test_bad_process_counts_and_node_ranks_are_coded_errors(home):
    assert "CONFIG_INVALID" in backprop("train", "--model", "demo", "--nproc", "0").stderr
    assert "CONFIG_INVALID" in backprop("train", "--model", "demo", "--nproc", "lots").stderr
    out = backprop("train", "--model", "demo", "--nnodes", "2", "--node-rank", "2", "--print-launch")
    assert "INPUT_INVALID_ARGUMENT" in out.stderr and "--node-rank 2 with --nnodes 2" in out.stderr
    assert Registry(home).list() == []


def test_nproc_is_listed_in_the_help_of_train_multi_run_and_run():
    for command in ("train", "multi-run", "run"):
        help_text = subprocess.run([sys.executable, "-m", "training.cli", command, "--help"], capture_output=True, text=True)
        assert "--nproc N|auto" in help_text.stdout and "--nnodes" in help_text.stdout
