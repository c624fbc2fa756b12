"""Two nodes: two torchrun agents (``--nnodes 2``, c10d rendezvous on 127.0.0.1, gloo, one process each) train the
demo and give the losses and weights of a single process on the same global batches; a node whose worker is killed
mid-run is restarted by its elastic agent (``--max-restarts``) and the run resumes exactly.

The backbone is ``bn_free_test`` (``tests/multinode_worker.py``): without BatchNorm, how a global batch is split
over ranks changes no sample's features, and the m-per-class sampler draws the same global batches for any number
of ranks, so one process is the reference. SimCLR's negatives are gathered across the two nodes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import multinode_worker  # noqa: F401 - registers the bn_free_test backbone in this process too
import pytest
import torch
from gloo_ranks import free_port

from contrastlab.config.load import load_config
from contrastlab.engine.checkpoint import load_checkpoint
from contrastlab.engine.trainer import train

pytestmark = pytest.mark.usefixtures("one_thread")

WORKER = Path(__file__).parent / "multinode_worker.py"
RUN = [
    "model.arch=bn_free_test", "model.width=1.0", "method.proj_hidden_bn=false", "method.proj_hidden_dim=16", "method.proj_out_dim=8",
    "data.sampler=m_per_class", "data.samples_per_class=2", "data.batch_size=8", "data.subset=32",
    "data.workers=0", "data.image_size=16", "train.device=cpu", "train.epochs=2", "train.deterministic=true",
    "train.checkpoint_every_steps=2", "train.log_every=1000", "monitor.knn_every=0", "monitor.max_bank=32",
    "monitor.max_test=16", "monitor.knn_k=5", "observers=[knn]",
]  # 32 images, global batch 8 (4 classes x 2): 4 steps an epoch, 8 in all


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def _stopped_agents_logs(agents: list[subprocess.Popen]) -> str:
    """Stop the torchrun agents and return the end of each one's output. SIGTERM, not SIGKILL: an agent stops its
    workers on SIGTERM, and they hold its output pipes too (each runs in a session of its own)."""
    for agent in agents:
        agent.terminate()
    logs = []
    for node, agent in enumerate(agents):
        try:
            tail = "".join(agent.communicate(timeout=60))[-5000:]
        except subprocess.TimeoutExpired:
            agent.kill()
            tail = "(its output pipes were still held 60 s after SIGTERM)"
        logs.append(f"node {node} (exit status {agent.wait()}):\n{tail}")
    return "\n".join(logs)


def test_two_nodes_match_one_process_and_a_killed_node_resumes_exactly(tmp_path):
    reference = tmp_path / "one_process"
    train(load_config("demo", [f"out={reference}", *RUN]), quiet=True)

    out, port = tmp_path / "two_nodes", free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CONTRASTLAB_TEST_KILL": "1",
           "PYTHONPATH": os.pathsep.join([str(WORKER.parent), os.environ.get("PYTHONPATH", "")])}
    agents = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node), "--nproc-per-node",
         "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "contrastlab-test",
         "--max-restarts", "1", "--monitor-interval", "0.2", str(WORKER), "train", "demo", f"out={out}", *RUN],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for node in (0, 1)]
    try:
        outputs = [agent.communicate(timeout=240) for agent in agents]
    except subprocess.TimeoutExpired:  # say where each node was
        pytest.fail("the torchrun agents had not both finished after 240 s\n" + _stopped_agents_logs(agents))
    finally:
        for agent in agents:
            if agent.poll() is None:
                agent.kill()
    logs = "".join(err for _, err in outputs)
    assert [a.returncode for a in agents] == [0, 0], logs[-4000:]
    assert "torchrun restarted this job: resuming from its last checkpoint" in logs  # the kill happened, then resume
    assert "resumed from" in logs and "batch 2 of epoch 1" in logs  # mid-epoch, where the killed worker stopped
    assert "run lock: took over" in logs  # rank 0's lock, left by the killed worker, taken over by its restart
    run = json.loads((out / "run.json").read_text())
    assert run["derived"]["world_size"] == 2 and run["derived"]["per_rank_batch_size"] == 4

    assert _losses(out) == pytest.approx(_losses(reference), rel=1e-5)
    ours, ref = (load_checkpoint(r / "checkpoints" / "last.pt") for r in (out, reference))
    assert ours["step"] == ref["step"] == 8
    for key, value in ref["method"].items():
        torch.testing.assert_close(ours["method"][key], value, rtol=1e-5, atol=1e-6, msg=key)
