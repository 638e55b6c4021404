"""One rank of a data-parallel CPU run, launched by the tests through torchrun:

python -m torch.distributed.run --standalone --nproc_per_node 2 -m tests.dp_child RUN_DIR DATA_ROOT TOKENS [distopt]

`distopt`: with megatron's distributed optimizer (the GPU path's sharded optimizer state);
`distopt-bf16`: that in bf16 mixed precision, as on a GPU.
"""

from __future__ import annotations

import sys

from steplaw_train.train import run
from tests.conftest import tiny_options, tiny_spec

if __name__ == "__main__":
    run_dir, data_root, tokens = sys.argv[1], sys.argv[2], int(sys.argv[3])
    mode = sys.argv[4] if len(sys.argv) > 4 else ""
    extra = {"distributed_optimizer": True} if mode.startswith("distopt") else {}
    if mode == "distopt-bf16":
        extra["precision"] = "bf16"
    run(tiny_spec(tokens=tokens), run_dir, tiny_options(data_root, checkpoint_interval=20, **extra))
