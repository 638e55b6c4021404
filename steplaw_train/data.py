"""Data recipes → megatron-core training datasets; and the `prep` command.

A recipe (`DataSpec`: `configs/data/<recipe>.yaml`) names tokenized datasets and their blend
weights. `build_train_dataset` resolves each name to `<data_root>/datasets/<tokenizer>/<name>`,
builds the demo sources on first use, and hands the blend to megatron-core's
BlendedMegatronDatasetBuilder: a GPTDataset for one source, a BlendedDataset for several.

Choices (see docs/data.md):
- Train split only (`split="1,0,0"`): the Step Law metric is the smoothed *training* loss of a
  single pass, so no validation set is built.
- megatron's index caches (document/sample/shuffle and blending indices) go to
  `<data_root>/cache`; building one entry is serialised across processes with an flock per
  entry (seed, seq_len, sample count, sources), because megatron checks a cache only by file
  existence and writes its .npy files in place.
- Indices are a deterministic function of (dataset lengths, seed, seq_len, num_samples, weights).

CLI:  python -m steplaw_train.data prep --name NAME --input PATH_OR_GLOB... \
          [--tokenizer byte|bpe:32000|NAME] [--data-root DIR]
      python -m steplaw_train.data check --recipe demo [--data-root DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from steplaw_train import corpus, locks
from steplaw_train.spec import DataSpec, SpecError
from steplaw_train.tokenizer import (
    BYTE,
    Tokenizer,
    check_tokenizer_name,
    load_tokenizer,
    parse_tokenizer_arg,
    tokenizer_path,
    train_bpe,
)

TRAIN_ONLY_SPLIT = "1,0,0"


def _prep_hint(name: str, tokenizer: str, data_root: Path) -> str:
    tok_arg = tokenizer if tokenizer == BYTE else f"{tokenizer} (or bpe:<vocab> to train one)"
    return (
        f"create it with `python -m steplaw_train.data prep --name {name} --input FILES... "
        f"--tokenizer {tok_arg} --data-root {data_root}`"
    )


def check_data(data: DataSpec, data_root: Path) -> None:
    """Raise SpecError naming the field if the recipe cannot be built from `data_root`.

    Cheap and side-effect free, so a trainer or sweep can call it before any job starts.
    Demo sources (`code`, `english`) count as present: they are built on first use.
    """
    data_root = Path(data_root)
    if not data.sources:
        raise SpecError("data.sources", "a recipe needs at least one dataset")
    check_tokenizer_name(data.tokenizer, data_root)
    n_ids = _tokenizer_ids(data.tokenizer, data_root)
    if data.vocab_size < n_ids:
        raise SpecError(
            "data.vocab_size",
            f"{data.vocab_size} is smaller than tokenizer {data.tokenizer!r}'s {n_ids} ids",
        )
    names = [n for n, _ in data.sources]
    if len(set(names)) != len(names):
        raise SpecError("data.sources", f"a dataset appears twice: {names}")
    missing = []
    for name, _ in data.sources:
        prefix = corpus.dataset_prefix(name, data.tokenizer, data_root)
        if corpus.dataset_exists(prefix):
            _check_meta(name, prefix, data, data_root)
            continue
        if name in corpus.DEMO_SOURCES:
            corpus.check_demo_source(name)
            continue
        missing.append(
            f"{name!r} (no {prefix}.bin/.idx; {_prep_hint(name, data.tokenizer, data_root)})"
        )
    if missing:
        raise SpecError("data.sources", "missing dataset " + "; ".join(missing))


def _tokenizer_ids(name: str, data_root: Path) -> int:
    if name == BYTE:
        from steplaw_train.tokenizer import ByteTokenizer

        return ByteTokenizer.vocab_size
    import json

    model = json.loads(tokenizer_path(name, data_root).read_text())
    return len(model["model"]["vocab"]) + sum(
        1 for t in model.get("added_tokens", []) if t["content"] not in model["model"]["vocab"]
    )


def _check_meta(name: str, prefix: Path, data: DataSpec, data_root: Path) -> None:
    """A dataset tokenized by an older version of a retrained tokenizer is refused."""
    meta = corpus.read_meta(prefix)
    if meta is None or data.tokenizer == BYTE:
        return
    want = hashlib.sha256(tokenizer_path(data.tokenizer, data_root).read_bytes()).hexdigest()[:16]
    got = meta.get("tokenizer_id", {}).get("sha256")
    if got and got != want:
        raise SpecError(
            "data.sources",
            f"dataset {name!r} was tokenized with another version of tokenizer "
            f"{data.tokenizer!r}; re-run prep for it",
        )


def build_train_dataset(
    data: DataSpec, seq_len: int, num_samples: int, seed: int, data_root: Path
) -> Any:
    """The training dataset of a recipe: at least `num_samples` sequences of `seq_len` tokens.

    Items are megatron's dicts: `tokens, labels, loss_mask, position_ids` (int64/float32 tensors
    of length seq_len), plus `dataset_id` (index into `data.sources`) when blended.
    Call it on every rank after torch.distributed is initialised (megatron builds on rank 0 first);
    without a process group a private one-process gloo group is used for the call.
    """
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    if seq_len <= 0 or num_samples <= 0:
        raise SpecError(
            "train.seq_len", f"seq_len and num_samples must be > 0 ({seq_len}, {num_samples})"
        )
    data_root = Path(data_root).resolve()
    check_data(data, data_root)
    tok = load_tokenizer(data.tokenizer, data_root)
    for name, _ in data.sources:
        if name in corpus.DEMO_SOURCES:
            corpus.ensure_demo_dataset(name, tok, data_root)
    prefixes = [str(corpus.dataset_prefix(n, data.tokenizer, data_root)) for n, _ in data.sources]
    weights = [float(w) for _, w in data.sources] if len(prefixes) > 1 else None
    tok.unique_identifiers["datasets"] = {p: _idx_digest(p) for p in prefixes}
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_len,
        blend=(prefixes, weights),
        split=TRAIN_ONLY_SPLIT,
        path_to_cache=str(data_root / "cache"),
        tokenizer=tok,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
    )
    builder = BlendedMegatronDatasetBuilder(GPTDataset, [num_samples, 0, 0], lambda: True, config)
    entry = _cache_entry(tok.unique_identifiers["datasets"], weights, seed, seq_len, num_samples)
    with _process_group(), _cache_lock(data_root, entry):
        dataset = builder.build()[0]
    assert len(dataset) >= num_samples, (len(dataset), num_samples)
    return dataset


def _idx_digest(prefix: str) -> str:
    """megatron keys its caches by path, not content: add the .idx digest so a re-prep rebuilds."""
    return hashlib.sha256(Path(f"{prefix}.idx").read_bytes()).hexdigest()[:16]


@contextlib.contextmanager
def _process_group() -> Iterator[None]:
    """megatron's BlendedDataset calls torch.distributed.get_rank(): give it a 1-process group."""
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    with tempfile.TemporaryDirectory() as d:
        dist.init_process_group("gloo", init_method=f"file://{d}/store", rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()


def _cache_entry(
    digests: dict[str, str], weights: list[float] | None, seed: int, seq_len: int, num_samples: int
) -> str:
    """A name for the index-cache entries one build writes: what megatron's own cache key
    (megatron_dataset.py: path prefix, seed, sequence length, sample count, split) depends on."""
    key = json.dumps([sorted(digests.items()), weights, seed, seq_len, num_samples])
    return hashlib.sha256(key.encode()).hexdigest()[:16]


@contextlib.contextmanager
def _cache_lock(data_root: Path, entry: str) -> Iterator[None]:
    """Serialise builds of one index-cache entry across jobs; only global rank 0 writes, so only
    it locks (other ranks wait at megatron's barrier and then read finished files).

    One lock per entry, not one for the whole cache: at a sweep's start dozens of array tasks
    build different entries (each run's sample count is in megatron's key) and must not queue
    behind each other while their other ranks wait in a collective. Two builds of the same
    entry still serialise, and the second finds the first's files.
    """
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_rank() != 0:
        yield
        return
    with locks.file_lock(data_root / ".locks" / f"index-{entry}.lock"):
        yield


# ---- CLI --------------------------------------------------------------------------------------
def prep(
    name: str, inputs: list[str], tokenizer: str = BYTE, data_root: Path = Path("data")
) -> dict:
    """Tokenize `inputs` into dataset `name`; `bpe:<vocab>` trains the BPE first if absent."""
    if name in corpus.DEMO_SOURCES:
        raise SpecError("--name", f"{name!r} is reserved for the built-in demo corpus")
    if not name or "/" in name or name.startswith("."):
        raise SpecError("--name", f"{name!r} is not a valid dataset name")
    tok_name, vocab = parse_tokenizer_arg(tokenizer)
    files = corpus.expand_inputs(inputs)
    if vocab is not None and not tokenizer_path(tok_name, data_root).is_file():
        train_bpe(corpus.read_documents(files), vocab, tokenizer_path(tok_name, data_root))
    tok: Tokenizer = load_tokenizer(tok_name, data_root)
    prefix = corpus.dataset_prefix(name, tok_name, data_root)
    source = f"{len(files)} files from {' '.join(inputs)}"
    return corpus.write_indexed_dataset(prefix, corpus.read_documents(files), tok, source)


def _recipe(name: str) -> DataSpec:
    from omegaconf import OmegaConf

    from steplaw_train.config import config_dir, data_from_cfg

    path = config_dir() / "data" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (config_dir() / "data").glob("*.yaml"))
        raise SpecError("data", f"unknown recipe {name!r}; known: {known}")
    return data_from_cfg(OmegaConf.load(path))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m steplaw_train.data", description=__doc__.split("\n")[0]
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prep", help="tokenize text files into a Megatron indexed dataset")
    p.add_argument("--name", required=True, help="dataset name, used in recipes' sources")
    p.add_argument(
        "--input",
        nargs="+",
        required=True,
        help="files, directories or globs; "
        "one document per file, or per line of a .jsonl file ('text' field)",
    )
    p.add_argument("--tokenizer", default=BYTE, help="byte | bpe:<vocab> (trains if absent) | NAME")
    p.add_argument("--data-root", type=Path, default=_default_root())
    c = sub.add_parser("check", help="check that a recipe's datasets exist (builds nothing)")
    c.add_argument("--recipe", required=True)
    c.add_argument("--data-root", type=Path, default=_default_root())
    b = sub.add_parser("demo", help="build the demo corpus now (otherwise built on first use)")
    b.add_argument("--data-root", type=Path, default=_default_root())
    args = ap.parse_args(argv)
    try:
        if args.cmd == "prep":
            print(prep(args.name, args.input, args.tokenizer, args.data_root))
        elif args.cmd == "check":
            check_data(_recipe(args.recipe), args.data_root)
            print(f"recipe {args.recipe!r}: ok under {args.data_root}")
        else:
            tok = load_tokenizer(BYTE, args.data_root)
            for name in corpus.DEMO_SOURCES:
                meta = corpus.ensure_demo_dataset(name, tok, args.data_root)
                print(meta or corpus.read_meta(corpus.dataset_prefix(name, BYTE, args.data_root)))
    except SpecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _default_root() -> Path:
    return Path(os.environ.get("STEPLAW_DATA_ROOT", "data"))


if __name__ == "__main__":
    sys.exit(main())
