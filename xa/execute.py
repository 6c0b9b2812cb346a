"""Execute: run a plan on the tensors torch saved.

Each step asks the node's rule for its factors once (now with the real
saved tensors), runs every term's cached contraction, adds the result into
a strided view of its target block, and frees the blocks that died with
the node. Nothing here looks at a tensor's values to decide what to do.
"""

from __future__ import annotations

import math

import torch

from .capture import Graph
from .plan import Plan


def run(plan: Plan, graph: Graph, overrides: dict, blocks: dict | None = None) -> tuple[dict, dict]:
    """Run ``plan`` from the initial ``blocks``; returns ``(blocks, retained)`` keyed like the plan's results."""
    dtype, device = graph.dtype, graph.device
    blocks = {} if blocks is None else blocks
    retained: dict = {}
    for step in plan.steps:
        if step.snapshot:
            kept = [blocks.get((step.value,) * k) for k in range(1, plan.order + 1)]
            if step.value == 0:  # the source's own first block: the identity, or this chunk's rows of it
                s = math.prod(graph.source_shape)
                kept[0] = blocks[(0,)] if (0,) in blocks else torch.eye(s, dtype=dtype, device=device)
            retained[step.value] = kept
        if not step.terms:
            continue
        rule = graph.rule(step.value, overrides)
        ctx = graph.ctx(step.value, meta=False)
        factors: dict = {}
        for term in step.terms:
            operands = []
            for key, view in term.sources:
                operands.append(blocks[key].reshape(view))
            for slots, k in term.operands:
                if slots not in factors:
                    factors[slots] = rule(ctx, slots)
                operands.append(factors[slots].operands[k][0].to(dtype))
            if term.expr is not None:
                result = term.expr(*operands, backend="torch")
            else:
                result = torch.ones((), dtype=dtype, device=device)
            target = blocks.get(term.target)
            if target is None:
                target = torch.zeros(plan.block_shapes[term.target], dtype=dtype, device=device)
                blocks[term.target] = target
            view = target.as_strided(term.view_sizes, term.view_strides)
            view.add_(result.reshape(term.result_shape), alpha=term.coef)
        for key in step.retire:
            blocks.pop(key, None)
    return blocks, retained
