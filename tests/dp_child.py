"""One rank of a data-parallel CPU run, launched by the tests through torchrun:

python -m torch.distributed.run --standalone --nproc_per_node 2 -m tests.dp_child RUN_DIR DATA_ROOT TOKENS
"""

from __future__ import annotations

import sys

from steplaw_train.train import run
from tests.conftest import tiny_options, tiny_spec

if __name__ == "__main__":
    run_dir, data_root, tokens = sys.argv[1], sys.argv[2], int(sys.argv[3])
    run(tiny_spec(tokens=tokens), run_dir, tiny_options(data_root, checkpoint_interval=20))
