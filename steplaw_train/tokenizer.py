"""Tokenizers the harness can train with, as the small objects megatron-core's datasets need.

Two kinds exist:
- `byte`: the 256 byte values plus an end-of-document token (EOD = 256). It needs no training,
  no files and no network, so the CPU demo works on a fresh machine. Its embedding table is padded
  to `padded_vocab_size(258) = 320` rows (a multiple of 64: GPU matmuls on vocab-sized dimensions
  run at full speed only when the size is a multiple of 64; the extra rows are never targets).
- `bpe<V>`: a byte-level BPE of at most V tokens trained locally with Hugging Face `tokenizers`
  (`python -m steplaw_train.data prep --tokenizer bpe:V`), saved as
  `<data_root>/tokenizers/bpe<V>/tokenizer.json`. Any other name under that folder works too.

GPTDatasetConfig reads only `vocab_size`, `eod`, `pad` and `unique_identifiers` from a tokenizer;
the last one enters megatron's index-cache hash, so a retrained BPE never reuses stale indices.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

from steplaw_train.spec import SpecError

BYTE = "byte"
EOD_TEXT = "<|endoftext|>"
PAD_TEXT = "<|pad|>"
VOCAB_MULTIPLE = 64
_BPE_ARG = re.compile(r"^bpe:(\d+)$")
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


class Tokenizer(Protocol):
    name: str
    vocab_size: int  # ids in use (not padded)
    eod: int
    pad: int
    unique_identifiers: OrderedDict

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...


def padded_vocab_size(n: int, multiple: int = VOCAB_MULTIPLE) -> int:
    """The embedding size for n token ids: rounded up to a multiple of 64 for GPU efficiency."""
    return -(-n // multiple) * multiple


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255; EOD = 256 ends every document; PAD = 257 never occurs."""

    name = BYTE
    vocab_size = 258
    eod = 256
    pad = 257

    def __init__(self) -> None:
        self.unique_identifiers = OrderedDict(class_="ByteTokenizer", vocab_size=self.vocab_size)

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class BPETokenizer:
    """A trained byte-level BPE (HF `tokenizers`); EOD and PAD are its first two special tokens."""

    def __init__(self, name: str, path: Path):
        from tokenizers import Tokenizer as HFTokenizer  # imported lazily: the demo never needs it

        self.name = name
        self.path = path
        self._tok = HFTokenizer.from_file(str(path))
        self.vocab_size = self._tok.get_vocab_size()
        self.eod = self._special(EOD_TEXT)
        self.pad = self._special(PAD_TEXT)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        self.unique_identifiers = OrderedDict(
            class_="BPETokenizer", name=name, vocab_size=self.vocab_size, sha256=digest
        )

    def _special(self, text: str) -> int:
        i = self._tok.token_to_id(text)
        if i is None:
            raise SpecError("data.tokenizer", f"{self.path} has no {text!r} token")
        return i

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids))


def tokenizer_path(name: str, data_root: Path) -> Path:
    return Path(data_root) / "tokenizers" / name / "tokenizer.json"


def available_tokenizers(data_root: Path) -> list[str]:
    root = Path(data_root) / "tokenizers"
    found = sorted(p.parent.name for p in root.glob("*/tokenizer.json")) if root.is_dir() else []
    return [BYTE, *found]


def check_tokenizer_name(name: str, data_root: Path) -> None:
    """SpecError("data.tokenizer") unless `name` is "byte" or a tokenizer saved under data_root."""
    if name == BYTE:
        return
    if not _NAME.match(name or ""):
        raise SpecError(
            "data.tokenizer", f"{name!r} is not a valid tokenizer name ([A-Za-z0-9_.-])"
        )
    if not tokenizer_path(name, data_root).is_file():
        raise SpecError(
            "data.tokenizer",
            f"unknown tokenizer {name!r}: no {tokenizer_path(name, data_root)}; available: "
            f"{available_tokenizers(data_root)}. Train one with `python -m steplaw_train.data prep "
            f"--tokenizer bpe:<vocab> --name NAME --input FILES --data-root {data_root}`",
        )


def load_tokenizer(name: str, data_root: Path) -> Tokenizer:
    check_tokenizer_name(name, data_root)
    if name == BYTE:
        return ByteTokenizer()
    return BPETokenizer(name, tokenizer_path(name, data_root))


def parse_tokenizer_arg(arg: str) -> tuple[str, int | None]:
    """`byte` → ("byte", None); `bpe:32000` → ("bpe32000", 32000); `NAME` → (NAME, None)."""
    m = _BPE_ARG.match(arg)
    if m:
        vocab = int(m.group(1))
        if vocab < 512:
            raise SpecError("--tokenizer", f"bpe vocab must be >= 512, got {vocab}")
        return f"bpe{vocab}", vocab
    if not _NAME.match(arg):
        raise SpecError(
            "--tokenizer", f"expected byte, bpe:<vocab> or a tokenizer name, got {arg!r}"
        )
    return arg, None


def train_bpe(texts: Iterable[str], vocab: int, out: Path) -> Path:
    """Train a byte-level BPE on `texts` and save it atomically to `out` (tokenizer.json)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=[EOD_TEXT, PAD_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    tok.save(str(tmp))
    _fsync(tmp)
    os.replace(tmp, out)
    return out


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def describe(tok: Any) -> dict[str, Any]:
    return {"name": tok.name, "vocab_size": tok.vocab_size, "eod": tok.eod, "pad": tok.pad}
