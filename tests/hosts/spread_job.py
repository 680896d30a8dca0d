"""A Ray job that proves every node of a cluster executes work: one task pinned to each alive node.

    python tests/hosts/spread_job.py RESULT.json [EXPECTED_NODES]

Waits (bounded) until EXPECTED_NODES nodes are alive, runs one 1-CPU task on each with a hard node-affinity
strategy and one SPREAD task per node, and writes what each task saw: the node it ran on (Ray's view), its
IP, and its network namespace (the kernel's view: different hosts have different namespaces).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy


@ray.remote(num_cpus=1)
def where(tag: str) -> dict:
    return {"tag": tag, "node_id": ray.get_runtime_context().get_node_id(),
            "node_ip": ray.util.get_node_ip_address(), "netns": os.readlink("/proc/self/ns/net"),
            "pid": os.getpid(), "hostname": socket.gethostname()}


def main(result_path: str, expected: int = 2, timeout: float = 120.0) -> None:
    ray.init(address="auto")
    deadline = time.monotonic() + timeout
    while True:
        alive = [n for n in ray.nodes() if n["Alive"]]
        if len(alive) >= expected or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    if len(alive) < expected:
        sys.exit(f"only {len(alive)} of {expected} nodes alive after {timeout:.0f} s: {alive}")
    pinned = [where.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
              .remote(f"pinned:{n['NodeManagerAddress']}") for n in alive]
    spread = [where.options(scheduling_strategy="SPREAD").remote("spread") for _ in alive]
    result = {"nodes": [{"node_id": n["NodeID"], "ip": n["NodeManagerAddress"], "resources": n["Resources"]}
                        for n in alive],
              "tasks": ray.get(pinned + spread, timeout=120),
              "driver": {"node_ip": ray.util.get_node_ip_address(), "netns": os.readlink("/proc/self/ns/net")}}
    with open(result_path, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result["tasks"]))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 2)
