"""One rank of a data-parallel CPU run, launched by the tests through torchrun:

python -m torch.distributed.run --standalone --nproc_per_node 2 -m tests.dp_child RUN_DIR DATA_ROOT TOKENS [MODE]

`distopt`: with megatron's distributed optimizer (the GPU path's sharded optimizer state);
`distopt-bf16`: that in bf16 mixed precision, as on a GPU. Both keep their step checkpoints
when the run finishes (prune_checkpoints=false: the tests load and resume from them).
`timed`: saves by rank 0's clock only (checkpoint_minutes=0.002, no step interval), every one
of them kept.
"""

from __future__ import annotations

import sys

from steplaw_train.train import run
from tests.conftest import tiny_options, tiny_spec

if __name__ == "__main__":
    run_dir, data_root, tokens = sys.argv[1], sys.argv[2], int(sys.argv[3])
    mode = sys.argv[4] if len(sys.argv) > 4 else ""
    extra: dict = {"checkpoint_interval": 20}
    if mode.startswith("distopt"):
        extra.update(distributed_optimizer=True, prune_checkpoints=False)
    if mode == "distopt-bf16":
        extra["precision"] = "bf16"
    if mode == "timed":
        extra.update(
            checkpoint_interval=None,
            checkpoint_minutes=0.002,
            keep_checkpoints=10**6,
            prune_checkpoints=False,
        )
    run(tiny_spec(tokens=tokens), run_dir, tiny_options(data_root, **extra))
