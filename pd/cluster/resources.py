"""Whether a plan's instances fit a cluster's resources, and why not.

Pure arithmetic on resource dicts (``{"CPU": 2.0, "GPU": 1.0}``), shared by
``pd-serve --dry-run``, the local pre-start check and the launcher's wait: each
instance is one Ray actor, which must fit on one node.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pd.cluster.plan import InstancePlan

# Ray keeps resource quantities to 4 decimals; anything smaller is rounding noise.
_EPSILON = 1e-4
# The resources pd asks Ray for, in the order messages list them.
_KINDS = ("CPU", "GPU")


@dataclass
class Node:
    name: str
    total: dict[str, float]
    free: dict[str, float] = field(default_factory=dict)  # what the plan leaves
    holders: list[str] = field(default_factory=list)  # instances placed on it
    labels: dict[str, str] = field(default_factory=dict)  # Ray node labels


def demand(instance: InstancePlan) -> dict[str, float]:
    """What the instance's actor asks Ray for."""
    wanted = {"CPU": float(instance.num_cpus), "GPU": float(instance.num_gpus)}
    wanted.update(instance.ray_resources)  # custom resources of its role's placement
    return {kind: amount for kind, amount in wanted.items() if amount > 0}


def fmt(resources: Mapping[str, float]) -> str:
    """``{"CPU": 0.66, "GPU": 0}`` -> ``CPU 0.66, GPU 0`` (pd's kinds only, in order)."""
    parts = [f"{kind} {resources.get(kind, 0.0):g}" for kind in _KINDS if kind in resources]
    parts += [f"{kind} {amount:g}" for kind, amount in resources.items() if kind not in _KINDS]
    return ", ".join(parts) or "nothing"


def fit_problems(instances: Iterable[InstancePlan], nodes: list[Node]) -> list[str]:
    """One line per instance that cannot be placed, naming what it needs and what the
    cluster has; empty when all fit. Places the largest demands first on the first node
    with room (first-fit decreasing): exact for one node, a close bound for several."""
    for each in nodes:
        each.free = {**each.total, **{kind: each.total.get(kind, 0.0) for kind in _KINDS}}
        each.holders = []
    problems: list[str] = []
    ordered = sorted(instances, key=lambda i: (-i.num_gpus, -i.num_cpus, i.name))
    for inst in ordered:
        wanted = demand(inst)
        eligible = [n for n in nodes if _eligible(n, inst)]
        if not eligible:
            problems.append(_no_such_node(inst, len(nodes)))
            continue
        node = next((n for n in eligible if _covers(n.free, wanted)), None)
        if node is not None:
            for kind, amount in wanted.items():
                node.free[kind] -= amount
            node.holders.append(inst.name)
            continue
        problems.append(_why_not(inst.name, wanted, nodes))
    return problems


def _eligible(node: Node, inst: InstancePlan) -> bool:
    """Whether ``node`` has the labels and the kinds of custom resources ``inst`` names."""
    labels = all(node.labels.get(key) == value for key, value in inst.node_labels.items())
    return labels and all(kind in node.total for kind in inst.ray_resources)


def _no_such_node(inst: InstancePlan, count: int) -> str:
    wanted = [f"label {k}={v}" for k, v in inst.node_labels.items()]
    wanted += [f"resource {kind}" for kind in inst.ray_resources]
    return (
        f"{inst.name} needs a node with {' and '.join(wanted)}; none of the cluster's "
        f"{count} nodes has it ({inst.role}.placement)"
    )


def _covers(have: Mapping[str, float], wanted: Mapping[str, float]) -> bool:
    return all(have.get(kind, 0.0) + _EPSILON >= amount for kind, amount in wanted.items())


def _why_not(name: str, wanted: dict[str, float], nodes: list[Node]) -> str:
    total = {kind: sum(n.total.get(kind, 0.0) for n in nodes) for kind in _KINDS}
    shown = [kind for kind in _KINDS if kind in wanted or total[kind] > 0]
    if not any(_covers(n.total, wanted) for n in nodes):
        biggest = max(nodes, key=lambda n: tuple(n.total.get(k, 0.0) for k in _KINDS))
        where = "the machine" if len(nodes) == 1 else f"its largest node ({biggest.name})"
        has = fmt({kind: biggest.total.get(kind, 0.0) for kind in shown})
        return f"{name} needs {fmt(wanted)}, more than {where} has in total ({has})"
    holders = [h for n in nodes for h in n.holders]
    verb = "takes" if len(holders) == 1 else "take"
    return (
        f"{name} needs {fmt(wanted)}; the cluster has "
        f"{fmt({kind: total[kind] for kind in shown})} in total and {', '.join(holders)} "
        f"{verb} the rest"
    )


# --- the local machine -----------------------------------------------------------------


def local_node(cpus: float) -> Node:
    """The machine a local cluster runs on: ``cpus`` and the GPUs visible here."""
    return Node("this machine", {"CPU": float(cpus), "GPU": float(local_gpu_count())})


def local_gpu_count() -> int:
    """GPUs a local Ray cluster would see: CUDA_VISIBLE_DEVICES if set, else the
    NVIDIA device files (cheap: no CUDA initialisation)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    return sum(1 for p in Path("/dev").glob("nvidia*") if re.fullmatch(r"nvidia\d+", p.name))
