"""The Ray backend: the same models.yaml placed over the nodes of a Ray cluster (docs/cluster.md).

Optional: sem imports Ray only when `cluster: {backend: ray}` (or `--cluster-address`) asks for
it, so a single box needs no Ray installed.
"""

NAMESPACE = "sem"  # the Ray namespace of sem's named, detached node agents
GPU_MEMORY_RESOURCE = "sem_gpu_gib"  # a node's declared memory per GPU, in GiB (no NVML there)
NODE_ENV = "SEM_RAY_NODE"  # marks every engine process with the Ray node it runs on
CACHE_ENV = "SEM_CACHE_DIR"  # on a node: its own model cache folder (default: the supervisor's)
AGENT_PREFIX = "sem-node-"


def agent_name(node_id: str) -> str:
    """The node agent's actor name: one per node, found again by any supervisor run."""
    return AGENT_PREFIX + node_id
