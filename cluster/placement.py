"""Where each routed expert lives: for every MoE layer and logical expert, its physical copies.

The planner writes this map and the serving engine reads it, so both agree on which worker computes which
expert. A copy is (node, worker within the node, slot): the slot is the expert's index in that worker's
local expert tensor for the layer. Worker *rank* is the global index over the replica, node-major
(node 0's workers first). One logical expert may have several copies (a load balancer may replicate hot
experts); every expert has at least one.

JSON form (`herd.placement/v1`)::

    {"format": "herd.placement/v1", "num_experts": 128, "workers_per_node": [8, 8],
     "layers": {"1": [[{"node": 0, "worker": 0, "slot": 0}], ...one list of copies per expert...], ...}}
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

FORMAT = "herd.placement/v1"


class PlacementError(ValueError):
    """A placement map that breaks a rule (missing expert, clashing slot, worker out of range)."""


@dataclass(frozen=True, order=True)
class ExpertCopy:
    """One physical copy of a logical expert."""

    node: int
    worker: int  # index within the node
    slot: int  # index in that worker's local expert tensor for the layer


class PlacementMap:
    """Expert copies per MoE layer, with lookups both ways (expert -> copies, worker -> experts)."""

    def __init__(self, num_experts: int, workers_per_node: list[int] | tuple[int, ...],
                 layers: dict[int, list[list[ExpertCopy]]]):
        self.num_experts = int(num_experts)
        self.workers_per_node = tuple(int(w) for w in workers_per_node)
        self.layers = {int(k): [list(c) for c in v] for k, v in sorted(layers.items())}
        self._offsets = [sum(self.workers_per_node[:n]) for n in range(len(self.workers_per_node))]
        self._validate()
        # (layer, rank) -> logical experts in slot order
        self._by_worker: dict[tuple[int, int], list[int]] = {}
        for layer, experts in self.layers.items():
            held: dict[int, list[tuple[int, int]]] = {}
            for e, copies in enumerate(experts):
                for c in copies:
                    held.setdefault(self.rank(c.node, c.worker), []).append((c.slot, e))
            for r in range(self.num_workers):
                self._by_worker[(layer, r)] = [e for _, e in sorted(held.get(r, []))]

    # ---- construction -----------------------------------------------------------------------------------
    @classmethod
    def contiguous(cls, moe_layers: list[int], num_experts: int, workers_per_node: list[int] | int,
                   nodes: int, redundant: int = 0) -> "PlacementMap":
        """The default layout: worker r holds a contiguous block of experts, the same on every layer.

        With `redundant` > 0, extra copies of experts 0, 1, ... fill the slots after the last expert, so
        they land on the last workers, away from the originals. Blocks differ in size by at most one.
        """
        wpn = [workers_per_node] * nodes if isinstance(workers_per_node, int) else list(workers_per_node)
        if len(wpn) != nodes:
            raise PlacementError(f"workers_per_node lists {len(wpn)} nodes but nodes is {nodes}")
        order = list(range(num_experts)) + [i % num_experts for i in range(redundant)]
        n_workers = sum(wpn)
        base, extra = divmod(len(order), n_workers)
        where = [(node, w) for node in range(nodes) for w in range(wpn[node])]
        experts: list[list[ExpertCopy]] = [[] for _ in range(num_experts)]
        pos = 0
        for rank, (node, w) in enumerate(where):
            size = base + (1 if rank < extra else 0)
            for slot in range(size):
                experts[order[pos]].append(ExpertCopy(node, w, slot))
                pos += 1
        return cls(num_experts, wpn, {layer: experts for layer in moe_layers})

    # ---- lookups ----------------------------------------------------------------------------------------
    @property
    def num_workers(self) -> int:
        return sum(self.workers_per_node)

    @property
    def nodes(self) -> int:
        return len(self.workers_per_node)

    @property
    def moe_layers(self) -> list[int]:
        return list(self.layers)

    def rank(self, node: int, worker: int) -> int:
        """Global worker rank of (node, worker), node-major."""
        return self._offsets[node] + worker

    def copies(self, layer: int, expert: int) -> list[ExpertCopy]:
        """Physical copies of a logical expert on a layer."""
        return list(self._layer(layer)[expert])

    def experts_on(self, worker_rank: int, layer: int) -> list[int]:
        """Logical experts a worker holds on a layer, in slot order."""
        self._layer(layer)
        if not 0 <= worker_rank < self.num_workers:
            raise KeyError(f"worker rank {worker_rank} out of range (0..{self.num_workers - 1})")
        return list(self._by_worker[(layer, worker_rank)])

    def max_slots_per_worker(self) -> int:
        """The most expert copies any worker holds on any layer (what sizes its memory)."""
        return max((len(v) for v in self._by_worker.values()), default=0)

    def is_uniform(self) -> bool:
        """True when every layer has the same layout (so one line per worker describes it)."""
        first = next(iter(self.layers.values()), None)
        return all(v == first for v in self.layers.values())

    def _layer(self, layer: int) -> list[list[ExpertCopy]]:
        try:
            return self.layers[layer]
        except KeyError:
            raise KeyError(f"layer {layer} is not a MoE layer of this placement (MoE layers: "
                           f"{self.moe_layers})") from None

    # ---- JSON -------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "num_experts": self.num_experts,
            "workers_per_node": list(self.workers_per_node),
            "layers": {str(layer): [[{"node": c.node, "worker": c.worker, "slot": c.slot} for c in copies]
                                    for copies in experts] for layer, experts in self.layers.items()},
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_dict(cls, d: dict) -> "PlacementMap":
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise PlacementError(f"not a placement map: expected \"format\": \"{FORMAT}\"")
        try:
            layers = {int(k): [[ExpertCopy(int(c["node"]), int(c["worker"]), int(c["slot"])) for c in copies]
                               for copies in experts] for k, experts in d["layers"].items()}
            return cls(int(d["num_experts"]), [int(w) for w in d["workers_per_node"]], layers)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            if isinstance(e, PlacementError):
                raise
            raise PlacementError(f"malformed placement map: {type(e).__name__}: {e}") from None

    @classmethod
    def from_json(cls, text: str) -> "PlacementMap":
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise PlacementError(f"placement map is not valid JSON: {e}") from None

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> "PlacementMap":
        return cls.from_json(Path(path).read_text(encoding="utf-8"))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PlacementMap) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return (f"PlacementMap(num_experts={self.num_experts}, workers_per_node={list(self.workers_per_node)}, "
                f"moe_layers={self.moe_layers})")

    # ---- rules ------------------------------------------------------------------------------------------
    def _validate(self) -> None:
        if self.num_experts < 1 or not self.workers_per_node or min(self.workers_per_node) < 1:
            raise PlacementError("placement needs num_experts >= 1 and at least one worker on every node")
        for layer, experts in self.layers.items():
            if len(experts) != self.num_experts:
                raise PlacementError(f"layer {layer}: {len(experts)} experts listed, expected {self.num_experts}")
            taken: set[tuple[int, int, int]] = set()
            for e, copies in enumerate(experts):
                if not copies:
                    raise PlacementError(f"layer {layer}: expert {e} has no copy; every expert needs at least one")
                for c in copies:
                    if not (0 <= c.node < self.nodes and 0 <= c.worker < self.workers_per_node[c.node]):
                        raise PlacementError(f"layer {layer}: expert {e} placed on node {c.node} worker {c.worker},"
                                             f" which does not exist (workers per node: {list(self.workers_per_node)})")
                    if c.slot < 0:
                        raise PlacementError(f"layer {layer}: expert {e} has negative slot {c.slot}")
                    if (c.node, c.worker, c.slot) in taken:
                        raise PlacementError(f"layer {layer}: node {c.node} worker {c.worker} slot {c.slot} "
                                             f"is used twice; slots must be unique per worker")
                    taken.add((c.node, c.worker, c.slot))
            per_worker: dict[tuple[int, int], list[int]] = {}
            for node, worker, slot in taken:
                per_worker.setdefault((node, worker), []).append(slot)
            for (node, worker), slots in per_worker.items():
                if sorted(slots) != list(range(len(slots))):
                    raise PlacementError(f"layer {layer}: node {node} worker {worker} uses slots {sorted(slots)}; "
                                         f"slots must be 0..{len(slots) - 1} with no gaps")


def resolve_placement(placement, moe_layers: list[int], num_experts: int, workers_per_node: int, nodes: int,
                      redundant: int = 0) -> "PlacementMap":
    """The placement for a layout: the given map (or one loaded from a JSON path), else the contiguous default.

    The one rule for both the cluster planner and the engine: a given map must be for this layout (nodes x
    workers per node) and this model (experts, MoE layers); a PlacementError says which and how to fix it.
    """
    if placement is None:
        return PlacementMap.contiguous(list(moe_layers), max(1, num_experts), workers_per_node, nodes,
                                       redundant=redundant)
    if isinstance(placement, (str, Path)):
        placement = PlacementMap.load(placement)
    want = [workers_per_node] * nodes
    if (placement.num_experts, list(placement.workers_per_node), placement.moe_layers) != \
            (num_experts, want, sorted(moe_layers)):
        other = placement.num_experts != num_experts or placement.moe_layers != sorted(moe_layers)
        raise PlacementError(
            f"is for {placement.num_experts} experts on workers {list(placement.workers_per_node)} and MoE layers "
            f"{placement.moe_layers[:4]}..., but this layout has {num_experts} experts on workers {want} "
            f"({nodes} nodes x {workers_per_node} workers) and MoE layers {sorted(moe_layers)[:4]}...; "
            + ("it was planned for another model" if other else "plan the placement for this layout")
            + " (herd plan --placement-out)")
    return placement
