"""text.py: documents from files, packing into [B, ctx] rows, special masks, fingerprints, error messages."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from sae_lightning.config import DataConfig
from sae_lightning.lm import text
from sae_lightning.lm.text import (
    iter_documents,
    iter_token_batches,
    pack_rows,
    read_documents,
    special_token_mask,
    text_fingerprint,
)

DOCS = ["Once upon a time there was a cat.", "The dog ran to the park and played all day long.",
        "Lily said hello.", "Tom and Sue found a big red ball under the tree."]


def _write(path: Path, docs: list[str], sep: str = "<|endoftext|>") -> Path:
    path.write_text(f"\n{sep}\n".join(docs) + f"\n{sep}\n", encoding="utf-8")
    return path


def _cfg(path: Path, **kw) -> DataConfig:
    return DataConfig(**{"source": "files", "path": str(path), "context_size": 8, "n_tokens": 10_000, **kw})


def _expected_stream(docs: list[str], tok) -> list[int]:
    out: list[int] = []
    for doc in docs:
        out += tok(doc, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return out


def test_documents_of_the_tinystories_sample(tinystories_path: Path) -> None:
    docs = iter_documents(DataConfig(source="files", path=str(tinystories_path)))
    first, second = next(docs), next(docs)
    assert first.startswith("One day, a little girl named Lily found a needle")
    assert first.endswith("they were sharing and helping each other.") or "<|endoftext|>" not in first
    assert second.startswith("Once upon a time, there was a little car named Beep.")


@pytest.mark.parametrize("chunk", [3, 7, 1 << 20])
def test_documents_split_across_read_chunks(tmp_path: Path, monkeypatch, chunk: int) -> None:
    docs = ["Ünïcödé ☃ first", "second — doc", "third"]
    monkeypatch.setattr(text, "_READ_CHUNK_BYTES", chunk)
    assert list(read_documents(_write(tmp_path / "a.txt", docs), "<|endoftext|>")) == docs


def test_without_a_separator_each_file_is_one_document(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(text, "_READ_CHUNK_BYTES", 5)  # the document spans many read chunks
    (tmp_path / "a.txt").write_text("First paragraph.\n\nSecond <|endoftext|> paragraph.\n", encoding="utf-8")
    (tmp_path / "b.txt").write_text("  Another file.  ", encoding="utf-8")
    docs = list(iter_documents(_cfg(tmp_path, separator=None)))
    assert docs == ["First paragraph.\n\nSecond <|endoftext|> paragraph.", "Another file."]


def test_packing_with_bos(tiny_tokenizer) -> None:
    rows = torch.from_numpy(np.concatenate(list(pack_rows(DOCS, tiny_tokenizer, 8, prepend_bos=True))))
    assert rows.shape[1] == 8
    assert (rows[:, 0] == tiny_tokenizer.bos_token_id).all()
    stream = _expected_stream(DOCS, tiny_tokenizer)
    n = len(stream) // 7
    assert rows.shape[0] == n
    assert rows[:, 1:].reshape(-1).tolist() == stream[: n * 7]
    assert tiny_tokenizer.bos_token_id not in rows[:, 1:].reshape(-1).tolist()


def test_packing_without_bos_is_plain_chunks(tiny_tokenizer) -> None:
    rows = torch.from_numpy(np.concatenate(list(pack_rows(DOCS, tiny_tokenizer, 8, prepend_bos=False))))
    stream = _expected_stream(DOCS, tiny_tokenizer)
    assert rows.reshape(-1).tolist() == stream[: rows.numel()]
    assert len(stream) - rows.numel() < 8


def test_multiple_files_in_order_and_deterministic(tmp_path: Path, tiny_tokenizer) -> None:
    _write(tmp_path / "b.txt", DOCS[2:])
    _write(tmp_path / "a.txt", DOCS[:2])
    (tmp_path / "ignored.md").write_text("not text data")
    cfg = _cfg(tmp_path, prepend_bos=False, n_tokens=8 * 2 * 4)
    assert list(iter_documents(cfg)) == DOCS
    assert list(iter_documents(_cfg(tmp_path / "*.txt"))) == DOCS
    first = torch.cat(list(iter_token_batches(cfg, tiny_tokenizer, 2)))
    assert first.shape == (8, 8)
    assert torch.equal(first, torch.cat(list(iter_token_batches(cfg, tiny_tokenizer, 2))))


def test_stops_after_n_tokens_rounded_up_to_batches(tinystories_path: Path, tiny_tokenizer) -> None:
    cfg = DataConfig(source="files", path=str(tinystories_path), context_size=16, n_tokens=16 * 4 * 2 + 1)
    batches = list(iter_token_batches(cfg, tiny_tokenizer, batch_size=4))
    assert [tuple(b.shape) for b in batches] == [(4, 16)] * 3


def test_short_source_warns_then_errors(tmp_path: Path, tiny_tokenizer) -> None:
    cfg = _cfg(_write(tmp_path / "a.txt", DOCS), context_size=8, n_tokens=10_000)
    with pytest.warns(UserWarning, match="ran out after"):
        batches = list(iter_token_batches(cfg, tiny_tokenizer, batch_size=1000))
    assert len(batches) == 1 and batches[0].shape[0] < 1000
    short = _cfg(_write(tmp_path / "short.txt", DOCS[2:3]), context_size=64)
    with pytest.raises(ValueError, match=r"fewer than data\.context_size=64"):
        list(iter_token_batches(short, tiny_tokenizer, 2))


def test_special_token_mask(tiny_tokenizer) -> None:
    tok = tiny_tokenizer
    word = tok("cat", add_special_tokens=False)["input_ids"][0]
    tokens = torch.tensor([[tok.bos_token_id, word, tok.eos_token_id], [word, tok.pad_token_id, word]])
    expected = torch.tensor([[True, False, True], [False, True, False]])
    assert torch.equal(special_token_mask(tokens, tok), expected)


def test_missing_bos_token_is_a_clear_error(tmp_path: Path, tiny_tokenizer) -> None:
    tok = tiny_tokenizer.__class__(tokenizer_object=tiny_tokenizer.backend_tokenizer, eos_token="</s>")
    with pytest.raises(ValueError, match=r"no BOS token.*prepend_bos=false"):
        next(iter_token_batches(_cfg(_write(tmp_path / "a.txt", DOCS), prepend_bos=True), tok, 2))


def test_file_errors_name_the_file(tmp_path: Path, tiny_tokenizer) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.txt.*matches no file"):
        list(iter_documents(_cfg(tmp_path / "nope.txt")))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match=r"empty\.txt is empty"):
        list(iter_documents(_cfg(tmp_path / "empty.txt")))
    (tmp_path / "sub").mkdir()
    with pytest.raises(FileNotFoundError, match=r"without \.txt files"):
        list(iter_documents(_cfg(tmp_path / "sub")))
    with pytest.raises(ValueError, match=r"data\.separator=''"):
        list(iter_documents(_cfg(_write(tmp_path / "a.txt", DOCS), separator="")))


@pytest.mark.parametrize("chunk", [4, 1 << 20])
def test_non_utf8_names_file_and_byte_offset(tmp_path: Path, monkeypatch, chunk: int) -> None:
    monkeypatch.setattr(text, "_READ_CHUNK_BYTES", chunk)
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("héllo wörld".encode() + b"\n<|endoftext|>\ncaf\xe9 au lait")
    offset = len("héllo wörld".encode() + b"\n<|endoftext|>\ncaf")
    message = rf"latin1\.txt is not valid UTF-8: byte 0xe9 at byte offset {offset}; re-encode"
    with pytest.raises(ValueError, match=message):
        list(iter_documents(_cfg(bad)))


def test_hub_offline_fails_fast_and_points_to_local_preset(monkeypatch, tmp_path: Path) -> None:
    import datasets

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path)
    start = time.monotonic()
    with pytest.raises(ConnectionError, match=r"'roneneldan/TinyStories'.*data=tinystories_local"):
        next(iter_documents(DataConfig(source="hub", name="roneneldan/TinyStories")))
    assert time.monotonic() - start < 5


def test_text_fingerprint(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("SAE_LIGHTNING_HOME", str(tmp_path / "home"))
    path = _write(tmp_path / "a.txt", DOCS)
    first = text_fingerprint(_cfg(path))
    assert first == text_fingerprint(_cfg(path))
    assert first != text_fingerprint(_cfg(path, separator="\n"))
    _write(path, DOCS[::-1])
    assert text_fingerprint(_cfg(path)) != first
    hub = DataConfig(source="hub", name="x/y")
    assert text_fingerprint(hub) != text_fingerprint(DataConfig(source="hub", name="x/y", split="validation"))


def _hub_dataset_in_cache(cache: Path, repo: str, texts: list[str]) -> None:
    """A prepared dataset laid out as ``datasets`` caches a hub download: ``owner___name/config/ver/hash``."""
    import datasets

    src = cache / "src.jsonl"
    src.write_text("\n".join(json.dumps({"text": t}) for t in texts), encoding="utf-8")
    datasets.load_dataset("json", data_files=str(src), split="train", cache_dir=str(cache / "build"))
    built = next(p for p in (cache / "build" / "json").glob("*/*/*") if p.is_dir())
    owner, name = repo.split("/")
    target = cache / f"{owner}___{name}" / "default" / "0.0.0" / built.name
    target.mkdir(parents=True)
    shutil.copy(built / "json-train.arrow", target / f"{name}-train.arrow")
    info = json.loads((built / "dataset_info.json").read_text())
    info.update(config_name="default", dataset_name=name)
    (target / "dataset_info.json").write_text(json.dumps(info))


def test_hub_offline_reads_the_local_datasets_cache(monkeypatch, tmp_path: Path) -> None:
    import datasets

    _hub_dataset_in_cache(tmp_path, "sae-test/tiny", DOCS)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)  # as if imported online
    assert list(iter_documents(DataConfig(source="hub", name="sae-test/tiny"))) == DOCS
    assert datasets.config.HF_HUB_OFFLINE is False, "offline mode must be switched back"
    with pytest.raises(ValueError, match=r"no column data\.text_column='story'.*\['text'\]"):
        next(iter_documents(DataConfig(source="hub", name="sae-test/tiny", text_column="story")))
