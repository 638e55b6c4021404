"""The sweep driver: `python -m steplaw_train.sweep +grid=NAME` and its status CLI.

The top of the import layering (docs/design.md): it imports the core (`steplaw_train.*`) and
`launch/`, and nothing below imports it. `common` holds what both searches share (expanding the
config, choosing which runs go out, the dry-run table, the sweep's records); `full` submits every
grid point, `guided` lets the Step-Law-guided search choose them; `status` reads a sweep back.
"""

from steplaw_train.sweep.common import SweepResult, expand_from_cfg
from steplaw_train.sweep.full import main, sweep

__all__ = ["SweepResult", "expand_from_cfg", "main", "sweep"]
