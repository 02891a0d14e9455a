"""The shipped cluster launchers run the CLI config as a cluster job would: ``launch/torchrun.sh``
as 2 "nodes" x 1 process on localhost, ``launch/slurm.sbatch`` under a stand-in ``srun`` that starts
one task per node with SLURM's variables (gloo on CPU)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from test_cli import MAIN_CONFIG, tiny_overrides

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env() -> dict:
    return dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                OMP_NUM_THREADS="1", PYTHON=sys.executable, ACCELERATOR="cpu")


def tiny_job(tmp_path: Path, vq_dir: str) -> list[str]:
    tiny = tiny_overrides(tmp_path, vq_dir)
    raw = yaml.safe_load(tiny.read_text())
    raw["test_after_fit"] = False
    raw["vqa_probe"] = {"max_records": 0}
    raw["generation_probe"] = {"max_images": 0}
    tiny.write_text(yaml.safe_dump(raw))
    return ["--config", str(MAIN_CONFIG), "--config", str(tiny)]


def finish(processes: list[subprocess.Popen], what: str) -> list[str]:
    outputs = []
    for process in processes:
        try:
            out, _ = process.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            for p in processes:
                os.killpg(p.pid, 9)
            pytest.fail(f"{what} did not finish in {TIMEOUT} s (hang)")
        outputs.append(out)
    for process, out in zip(processes, outputs):
        assert process.returncode == 0, f"{what} failed:\n{out[-3000:]}"
    return outputs


def test_torchrun_two_nodes_on_localhost(tmp_path, tiny_vq_dir):
    job = tiny_job(tmp_path, tiny_vq_dir)
    env = dict(base_env(), NNODES="2", MASTER_PORT=str(free_port()), PROCS_PER_NODE="1")
    nodes = [subprocess.Popen(["bash", str(ROOT / "launch" / "torchrun.sh"), *job], cwd=ROOT,
                              env=dict(env, NODE_RANK=str(rank)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, start_new_session=True) for rank in (0, 1)]
    out = "\n".join(finish(nodes, "launch/torchrun.sh on 2 nodes"))
    assert "MEMBER: 2/2" in out  # Lightning saw a world of 2 processes on 2 nodes
    run = tmp_path / "version_0"
    assert (run / "checkpoints" / "last.ckpt").is_file()
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["trainer"]["num_nodes"] == 2 and config["trainer"]["strategy"] == "ddp"


def test_the_slurm_script_under_a_stand_in_srun(tmp_path, tiny_vq_dir):
    job = tiny_job(tmp_path, tiny_vq_dir)
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "srun").write_text(
        "#!/usr/bin/env bash\n"
        "# stand-in srun: one task per node, with the variables srun gives each task\n"
        "pids=()\n"
        "for ((i=0; i<SLURM_NTASKS; i++)); do\n"
        "  SLURM_PROCID=$i SLURM_LOCALID=0 SLURM_NODEID=$i \"$@\" & pids+=($!)\n"
        "done\n"
        "rc=0; for p in \"${pids[@]}\"; do wait \"$p\" || rc=$?; done; exit $rc\n")
    (shim / "srun").chmod(0o755)
    env = dict(base_env(), PATH=f"{shim}:{os.environ['PATH']}", SLURM_NTASKS="2", SLURM_JOB_NUM_NODES="2",
               SLURM_NTASKS_PER_NODE="1", SLURM_NNODES="2", SLURM_NODELIST="localhost", SLURM_JOB_ID="4242",
               SLURM_JOB_NAME="unified_vlm", MASTER_PORT=str(free_port()))
    job_process = subprocess.Popen(["bash", str(ROOT / "launch" / "slurm.sbatch"), *job], cwd=ROOT, env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    out = finish([job_process], "launch/slurm.sbatch")[0]
    assert "MEMBER: 2/2" in out
    assert (tmp_path / "version_0" / "checkpoints" / "last.ckpt").is_file()
