"""Which format each tensor gets: the least predicted KL divergence within a byte budget.

Each tensor has options (bytes, predicted KL) in its level's formats; the
model's predicted KL is taken as the sum over tensors (each measured with
the others in fp32), which is the usual first-order assumption of
mixed-precision allocation. This is a multiple-choice knapsack, filled the
standard greedy way: per tensor, keep the options on the lower convex hull
of (bytes, KL); every step along a hull buys some KL for some bytes; take the
steps in order of KL saved per byte, skipping a step that no longer fits (and
the later steps of that tensor, which build on it). With many small items
this is within one item of the optimum.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Hashable, Mapping

from .graph import WeightSite
from .levels import Format
from .sites import embedding_block_size


@dataclass(frozen=True)
class Option:
    nbytes: int
    kl: float


def _hull(options: Mapping[Hashable, Option]) -> list[Hashable]:
    """The options worth having, by increasing bytes, each step saving less KL per byte than the last."""
    ordered = sorted(options, key=lambda k: (options[k].nbytes, options[k].kl))
    hull: list[Hashable] = []
    for key in ordered:
        if hull and options[key].kl >= options[hull[-1]].kl:
            continue  # more bytes for no less KL
        while len(hull) >= 2:
            a, b = options[hull[-2]], options[hull[-1]]
            c = options[key]
            # drop b when going a -> c directly saves at least as much per byte as a -> b
            if (a.kl - b.kl) * (c.nbytes - a.nbytes) <= (a.kl - c.kl) * (b.nbytes - a.nbytes):
                hull.pop()
            else:
                break
        hull.append(key)
    return hull


def allocate(options: Mapping[str, Mapping[Hashable, Option]], budget: int) -> tuple[dict[str, Hashable], bool]:
    """({tensor: chosen option key}, whether the cheapest choice of every tensor fit the budget at all)."""
    hulls = {tensor: _hull(choices) for tensor, choices in options.items()}
    chosen = {tensor: hull[0] for tensor, hull in hulls.items()}
    spent = sum(options[t][k].nbytes for t, k in chosen.items())
    steps = []
    for tensor, hull in hulls.items():
        for rank, (low, high) in enumerate(zip(hull, hull[1:])):
            a, b = options[tensor][low], options[tensor][high]
            steps.append(((a.kl - b.kl) / max(b.nbytes - a.nbytes, 1), tensor, rank, high, b.nbytes - a.nbytes))
    steps.sort(key=lambda s: (-s[0], s[1], s[2]))
    blocked: set[str] = set()
    for _, tensor, rank, key, cost in steps:
        if tensor in blocked:
            continue
        if spent + cost > budget:
            blocked.add(tensor)
            continue
        chosen[tensor] = key
        spent += cost
    return chosen, sum(options[t][hulls[t][0]].nbytes for t in options) <= budget


def format_bytes(site: WeightSite, form: Format) -> int:
    """What MatMulNBits / GatherBlockQuantized store for the site in `form`: codes, fp32 scales, packed zero points."""
    blocks = -(-site.k // form.block)
    return site.n * (blocks * form.block * form.bits // 8 + 4 * blocks + -(-blocks * form.bits // 8))


def site_formats(site: WeightSite, formats: tuple[Format, ...]) -> tuple[Format, ...]:
    """The formats this site can take, cheapest first, without those another format beats in precision (as
    many bits or more, blocks as short or shorter) for no more bytes: a block longer than the tensor's inputs
    is only padding, and then 2/128 costs what 4/64 does."""
    if site.op == "Gather":  # GatherBlockQuantized needs whole blocks along the hidden axis
        formats = tuple(Format(f.bits, embedding_block_size(site.k, f.block)) for f in formats)
    formats = tuple(dict.fromkeys(formats))
    kept = [f for f in formats if not any(g != f and g.bits >= f.bits and g.block <= f.block
                                          and format_bytes(site, g) <= format_bytes(site, f) for g in formats)]
    return tuple(sorted(kept, key=lambda f: (format_bytes(site, f), f)))


def allocate_sites(sites: list[WeightSite], formats_of: Mapping[str, tuple[Format, ...]],
                   predicted: Mapping[str, Mapping[Format, float]], nbytes: Callable[[str, Format], int],
                   budget_bytes: int, fixed_bytes: int, tied: Mapping[str, WeightSite] = {}) -> dict[str, Any]:
    """Each site's format (`formats_of` cheapest first, `nbytes(node, format)` as stored), and the record.

    A tied embedding (`tied`: {head node: embedding site}, both with the same formats) reads the head's blocks:
    the pair is one choice, its bytes counted once and its KL the sum of both sites' predictions."""
    shared = {embedding.node: head for head, embedding in tied.items()}

    def kl(node: str, form: Format) -> float:
        return predicted[node][form] + (predicted[tied[node].node][form] if node in tied else 0.0)

    options = {site.node: {f: Option(nbytes(site.node, f), kl(site.node, f)) for f in formats_of[site.node]}
               for site in sites if site.node not in shared}
    format_of, fits = allocate(options, budget_bytes - fixed_bytes)
    planned = fixed_bytes + sum(options[node][f].nbytes for node, f in format_of.items())
    format_of.update({embedding: format_of[head] for embedding, head in shared.items()})
    return {
        "budget_bytes": budget_bytes,
        "fixed_bytes_estimate": fixed_bytes,
        "planned_bytes": planned,
        "within_budget": fits,
        "raised": [s.name for s in sites if format_of[s.node] != formats_of[s.node][0]],
        "tied_embedding": bool(tied),
        "format_of": format_of,
        "predicted_kl": predicted,
    }
