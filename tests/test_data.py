"""Data: tokenizers, prep → indexed datasets, recipes as megatron blends, concurrency, errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from steplaw_train import corpus
from steplaw_train.config import data_from_cfg
from steplaw_train.data import build_train_dataset, check_data, main, prep
from steplaw_train.spec import DataSpec, SpecError
from steplaw_train.tokenizer import ByteTokenizer, load_tokenizer, padded_vocab_size

REPO = Path(__file__).resolve().parents[1]
A, B = ord("a"), ord("b")


def _write_docs(root: Path, letter: str, sizes: list[int]) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, n in enumerate(sizes):
        p = root / f"{letter}{i:03d}.txt"
        p.write_text(letter * n)
        paths.append(p)
    return paths


@pytest.fixture
def two_sources(tmp_path: Path) -> Path:
    """A data root with byte datasets `a` (only 'a' bytes) and `b` (only 'b' bytes)."""
    _write_docs(tmp_path / "txt_a", "a", [300 + 7 * i for i in range(40)])
    _write_docs(tmp_path / "txt_b", "b", [500 + 11 * i for i in range(30)])
    root = tmp_path / "root"
    prep("a", [str(tmp_path / "txt_a")], "byte", root)
    prep("b", [str(tmp_path / "txt_b" / "*.txt")], "byte", root)
    return root


def test_byte_tokenizer_round_trip_and_padding():
    tok = ByteTokenizer()
    text = "def f(x):\n    return 'naïve ✓'  # ünïcode\n"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8")) and max(ids) < 256
    assert tok.decode([*ids, tok.eod]) == text
    assert (tok.vocab_size, tok.eod, tok.pad) == (258, 256, 257)
    assert padded_vocab_size(tok.vocab_size) == 320
    assert padded_vocab_size(32000) == 32000 and padded_vocab_size(32001) == 32064


def test_prep_writes_dataset_megatron_reads_back(tmp_path: Path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "one.txt").write_text("first document\n")
    (tmp_path / "in" / "two.py").write_text("print('second')\n")
    records = ["third: jsonl record", "fourth — ünïcode"]
    (tmp_path / "in" / "r.jsonl").write_text(
        "".join(json.dumps({"text": t}) + "\n" for t in records)
    )
    root = tmp_path / "root"
    meta = prep("mine", [str(tmp_path / "in")], "byte", root)

    tok = ByteTokenizer()
    docs = ["first document\n", *records, "print('second')\n"]  # files sorted by path
    expected = [tok.encode(d) + [tok.eod] for d in docs]
    prefix = corpus.dataset_prefix("mine", "byte", root)
    ds = IndexedDataset(str(prefix))
    assert [ds[i].tolist() for i in range(len(ds))] == expected
    assert meta["documents"] == 4 and meta["tokens"] == sum(map(len, expected))
    assert corpus.read_meta(prefix)["tokens"] == meta["tokens"]
    assert sorted(p.name for p in prefix.parent.iterdir()) == ["mine.bin", "mine.idx", "mine.json"]


def test_interrupted_prep_leaves_no_dataset(tmp_path: Path):
    prefix = corpus.dataset_prefix("half", "byte", tmp_path)

    def docs():
        yield "x" * 1000
        raise KeyboardInterrupt  # the user pressed ^C in the middle

    with pytest.raises(KeyboardInterrupt):
        corpus.write_indexed_dataset(prefix, docs(), ByteTokenizer(), batch=1)
    assert not corpus.dataset_exists(prefix)
    assert list(prefix.parent.iterdir()) == []  # no tmp files left either
    with pytest.raises(SpecError, match="data.sources.*'half'.*prep --name half"):
        check_data(DataSpec("r", (("half", 1.0),), "byte", 320), tmp_path)


def test_bpe_prep_trains_tokenizer_and_round_trips(tmp_path: Path):
    text = (REPO / "steplaw_train" / "spec.py").read_text()
    (tmp_path / "src.txt").write_text(text)
    root = tmp_path / "root"
    meta = prep("specs", [str(tmp_path / "src.txt")], "bpe:600", root)
    tok = load_tokenizer("bpe600", root)
    assert (root / "tokenizers" / "bpe600" / "tokenizer.json").is_file()
    assert tok.vocab_size <= 600 and (tok.eod, tok.pad) == (0, 1)
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert len(ids) < len(text.encode()) / 2  # merges learned: real compression over bytes
    assert meta["tokens"] == len(ids) + 1
    check_data(DataSpec("r", (("specs", 1.0),), "bpe600", padded_vocab_size(tok.vocab_size)), root)
    with pytest.raises(SpecError, match="^data.vocab_size"):
        check_data(DataSpec("r", (("specs", 1.0),), "bpe600", 100), root)


def test_blend_weights_give_sample_proportions(two_sources: Path):
    spec = DataSpec("mix", (("a", 0.7), ("b", 0.3)), "byte", 320)
    ds = build_train_dataset(spec, seq_len=64, num_samples=1000, seed=7, data_root=two_sources)
    assert type(ds).__name__ == "BlendedDataset" and len(ds) >= 1000
    ids = [int(ds[i]["dataset_id"]) for i in range(1000)]
    counts = Counter(ids)
    assert abs(counts[0] - 700) <= 1 and abs(counts[1] - 300) <= 1
    for i in range(0, 1000, 37):  # each sample really comes from the source it is labelled with
        item = ds[i]
        letter = A if int(item["dataset_id"]) == 0 else B
        assert set(item["tokens"].tolist()) <= {letter, 256}
        assert item["tokens"].shape == item["labels"].shape == item["loss_mask"].shape == (64,)
        assert item["tokens"][1:].tolist() == item["labels"][:-1].tolist()
    assert (two_sources / "cache").is_dir()  # megatron's index caches stay under the data root


def test_single_source_is_a_gpt_dataset_with_enough_samples(two_sources: Path):
    spec = DataSpec("only_b", (("b", 1.0),), "byte", 320)
    ds = build_train_dataset(spec, seq_len=32, num_samples=2000, seed=1, data_root=two_sources)
    assert type(ds).__name__ == "GPTDataset" and len(ds) >= 2000  # 2000 > one epoch: repeats
    assert set(ds[1999]["tokens"].tolist()) <= {B, 256}
    assert {"tokens", "labels", "loss_mask", "position_ids"} <= set(ds[0])


def test_same_seed_same_samples_other_seed_differs(two_sources: Path):
    spec = DataSpec("mix", (("a", 0.5), ("b", 0.5)), "byte", 320)

    def first(seed: int) -> list[list[int]]:
        ds = build_train_dataset(
            spec, seq_len=64, num_samples=200, seed=seed, data_root=two_sources
        )
        return [ds[i]["tokens"].tolist() + [int(ds[i]["dataset_id"])] for i in range(20)]

    once = first(3)
    shutil.rmtree(two_sources / "cache")  # rebuilt from scratch, not read back from the cache
    assert first(3) == once
    assert first(4) != once


def test_reprep_invalidates_megatron_index_cache(two_sources: Path, tmp_path: Path):
    spec = DataSpec("only_a", (("a", 1.0),), "byte", 320)
    n_before = len(build_train_dataset(spec, 64, 10, 0, two_sources))
    _write_docs(tmp_path / "more_a", "a", [3000] * 20)
    prep("a", [str(tmp_path / "more_a")], "byte", two_sources)
    assert len(build_train_dataset(spec, 64, 10, 0, two_sources)) > n_before


def test_missing_dataset_and_bad_tokenizer_name_the_field(tmp_path: Path):
    with pytest.raises(SpecError) as e:
        check_data(DataSpec("r", (("code", 0.5), ("nowhere", 0.5)), "byte", 320), tmp_path)
    assert e.value.field == "data.sources"
    assert "'nowhere'" in str(e.value) and "steplaw_train.data prep --name nowhere" in str(e.value)
    with pytest.raises(SpecError, match="^data.tokenizer: unknown tokenizer 'bpe9'"):
        check_data(DataSpec("r", (("code", 1.0),), "bpe9", 320), tmp_path)
    with pytest.raises(SpecError, match="^data.sources"):
        build_train_dataset(DataSpec("r", (("gone", 1.0),), "byte", 320), 16, 4, 0, tmp_path)
    with pytest.raises(SpecError, match="^--name.*reserved"):
        prep("code", [str(REPO / "README.md")], "byte", tmp_path)


def test_cli_check_and_prep(tmp_path: Path, capsys):
    os.environ.pop("STEPLAW_CONFIG_DIR", None)
    assert main(["check", "--recipe", "custom_example", "--data-root", str(tmp_path)]) == 2
    assert "data.tokenizer" in capsys.readouterr().err
    assert main(["check", "--recipe", "nope", "--data-root", str(tmp_path)]) == 2
    assert "unknown recipe 'nope'" in capsys.readouterr().err
    assert main(["check", "--recipe", "demo", "--data-root", str(tmp_path)]) == 0
    _write_docs(tmp_path / "t", "z", [50])
    assert (
        main(["prep", "--name", "z", "--input", str(tmp_path / "t"), "--data-root", str(tmp_path)])
        == 0
    )
    assert corpus.dataset_exists(corpus.dataset_prefix("z", "byte", tmp_path))


@pytest.mark.parametrize(
    "path", sorted((REPO / "configs" / "data").glob("*.yaml")), ids=lambda p: p.stem
)
def test_recipe_files_parse(path: Path):
    spec = data_from_cfg(OmegaConf.load(path))
    assert spec.recipe == path.stem and spec.vocab_size % 64 == 0
    assert all(w > 0 for _, w in spec.sources)


_WORKER = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    from omegaconf import OmegaConf
    from steplaw_train import corpus
    from steplaw_train.config import data_from_cfg
    from steplaw_train.data import build_train_dataset
    from steplaw_train.tokenizer import ByteTokenizer
    root, go, recipe = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    spec = data_from_cfg(OmegaConf.load(recipe))
    print("ready", flush=True)
    while not go.exists():
        time.sleep(0.005)
    built = [n for n in corpus.DEMO_SOURCES if corpus.ensure_demo_dataset(n, ByteTokenizer(), root)]
    ds = build_train_dataset(spec, seq_len=128, num_samples=500, seed=11, data_root=root)
    first = [[int(ds[i]["dataset_id"]), ds[i]["tokens"][:16].tolist()] for i in range(8)]
    print(json.dumps({"built": built, "first": first}), flush=True)
    """
)


def test_concurrent_first_use_of_demo_corpus(tmp_path: Path):
    """Two jobs start at once on a fresh data root: the corpus is built once, both runs succeed
    (also building the same megatron index caches at the same time) and see the same samples."""
    root, go = tmp_path / "root", tmp_path / "go"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    recipe = str(REPO / "configs" / "data" / "demo_code_heavy.yaml")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(root), str(go), recipe],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env=env,
        )
        for _ in range(2)
    ]
    for p in procs:
        assert p.stdout.readline().strip() == "ready", p.stderr.read()
    go.touch()  # release both at the same moment
    outs = []
    deadline = time.monotonic() + 120
    for p in procs:
        out, err = p.communicate(timeout=max(1, deadline - time.monotonic()))
        assert p.returncode == 0, err
        outs.append(json.loads(out.strip().splitlines()[-1]))
    assert sorted(outs[0]["built"] + outs[1]["built"]) == sorted(corpus.DEMO_SOURCES)
    assert outs[0]["first"] == outs[1]["first"]
    for name, docs in (("code", 700), ("english", 1189)):
        meta = corpus.read_meta(corpus.dataset_prefix(name, "byte", root))
        assert meta["documents"] >= docs and meta["tokens"] > 1_000_000
