"""Law-guided LR×BS search: locate each (N, D) cell's optimum with a few runs instead of its grid.

One job per module: `cell` (what is searched), `config` (the knobs), `bowl` (the per-cell
Bayesian quadratic and what it says about untried points), `transfer` (what finished cells teach
the next: law, curvature, noise, how often a cell differs), `state` (the pure, immutable state
machine a sweep or the replay drives). Measured results: docs/search.md.
"""

from steplaw_train.search.bowl import axis_neighbours, grid_neighbours
from steplaw_train.search.cell import Cell, Proposal
from steplaw_train.search.config import PRIORS, SearchConfig
from steplaw_train.search.state import Assessment, SearchState, propose
from steplaw_train.search.transfer import Outcome

__all__ = [
    "PRIORS",
    "Assessment",
    "Cell",
    "Outcome",
    "Proposal",
    "SearchConfig",
    "SearchState",
    "axis_neighbours",
    "grid_neighbours",
    "propose",
]
