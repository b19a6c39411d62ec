"""Two nodes on one machine: each node in its own network namespace (joined by a veth pair),
one torchrun agent per node, c10d rendezvous across the 'network'. The losses equal one node
with two ranks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from helpers.configs import PRESET_TRAIN_FLAGS
from helpers.launch import REPO, TRAIN_MODULE, run_train, subprocess_env

pytestmark = pytest.mark.slow

FLAGS = (*PRESET_TRAIN_FLAGS, "--objective", "local-opt", "--local-opt-window-scope",
         "micro-batch", "--regularizer", "reco", "--reco-reduction", "mean")


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@pytest.fixture
def two_hosts():
    """Namespaces ``(name, address, interface)`` for two hosts on one link."""
    if shutil.which("ip") is None or os.geteuid() != 0:
        pytest.skip("needs root and iproute2's ip to make network namespaces")
    tag = f"{os.getpid() % 100000}"
    hosts = [(f"lo{tag}n{i}", f"10.213.{os.getpid() % 200}.{i + 1}", f"lo{tag}v{i}")
             for i in range(2)]
    try:
        for name, _, _ in hosts:
            _ip("netns", "add", name)
        _ip("link", "add", hosts[0][2], "type", "veth", "peer", "name", hosts[1][2])
        for name, address, interface in hosts:
            _ip("link", "set", interface, "netns", name)
            _ip("-n", name, "addr", "add", f"{address}/24", "dev", interface)
            _ip("-n", name, "link", "set", interface, "up")
            _ip("-n", name, "link", "set", "lo", "up")
    except subprocess.CalledProcessError as err:
        for name, _, _ in hosts:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        pytest.skip(f"cannot make network namespaces here: {err.stderr.strip()}")
    yield hosts
    for name, _, _ in hosts:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def test_two_nodes_match_one_node(tmp_path, two_hosts):
    one_node = run_train(tmp_path, *FLAGS, nproc=2, name="one-node")
    metrics = tmp_path / "two-nodes.jsonl"
    endpoint = f"{two_hosts[0][1]}:29611"
    procs = []
    for node, (name, address, interface) in enumerate(two_hosts):
        # the first node hosts the rendezvous store (torchrun cannot tell from a hostname here)
        cmd = ["ip", "netns", "exec", name, sys.executable, "-m", "torch.distributed.run",
               "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
               "--rdzv-endpoint", endpoint, "--rdzv-id", "localopt-two-nodes",
               "--rdzv-conf", f"is_host={int(node == 0)}", "--local-addr", address,
               "-m", TRAIN_MODULE, *FLAGS,
               "--metrics-file", str(metrics)]
        env = subprocess_env(GLOO_SOCKET_IFNAME=interface)
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=600) for p in procs]
    for proc, (_, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err[-5000:]
    two_nodes = [json.loads(line) for line in metrics.read_text().splitlines()]
    for key in ("lm loss", "reco loss", "window start", "grad norm"):
        assert [r[key] for r in two_nodes] == pytest.approx([r[key] for r in one_node],
                                                             rel=1e-5), key
