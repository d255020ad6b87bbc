"""Text sources (a streamed hub dataset or local text files) -> packed token batches ``[B, ctx]``.

Documents are tokenized in large batches (the fast tokenizers encode a batch in parallel), joined
with EOS between them and cut into rows of exactly ``context_size`` tokens; with ``prepend_bos`` every
row starts with BOS followed by ``context_size - 1`` text tokens (``auto``, the default: exactly when the
model's tokenizer prepends BOS itself, as Gemma's and LLaMA's do and GPT-2's and Pythia's do not). Nothing
is random, so the same config always gives the same rows. Also home to the small helpers that
``sae_lightning.lm`` shares: the quick hub reachability test and the cached file hash.
"""

from __future__ import annotations

import codecs
import contextlib
import glob
import hashlib
import json
import os
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sae_lightning.checks import ConfigError, MissingFileError, UserError
from sae_lightning.config import DataConfig
from sae_lightning.io import atomic_write_json, sha256_file

LOCAL_DATA_PRESET = "data=tinystories_local"
_READ_CHUNK_BYTES = 1 << 20
_FIRST_TOKENIZE_CHARS = 1 << 14
_TOKENIZE_CHARS = 1 << 20
_HUB_TIMEOUT_S = 3.0
_TRUE = ("1", "ON", "YES", "TRUE")


class DataError(UserError, ValueError):
    """The text a config points at cannot be used (empty, not UTF-8, too short); the message names the file
    and the fix."""


class DatasetUnavailableError(UserError, ConnectionError):
    """A hub dataset cannot be streamed (offline and not cached); the message names the local preset."""


# ---------------------------------------------------------------- shared helpers (also used by lm/)

def sae_lightning_home() -> Path:
    """Root of our own caches: ``$SAE_LIGHTNING_HOME``, default ``~/.cache/sae_lightning``."""
    return Path(os.environ.get("SAE_LIGHTNING_HOME", "~/.cache/sae_lightning")).expanduser()


def hub_offline_reason() -> str | None:
    """Why the Hugging Face hub cannot be used right now (``None`` when it answers).

    Honours ``HF_HUB_OFFLINE``; otherwise sends one HEAD request with a short timeout, so an offline
    machine learns it in seconds instead of after the libraries' minute of retries. The network answer
    is remembered for the life of the process.
    """
    from huggingface_hub import constants

    if constants.is_offline_mode() or os.environ.get("HF_HUB_OFFLINE", "").upper() in _TRUE:
        return "HF_HUB_OFFLINE is set"
    return _probe_hub(constants.ENDPOINT)


@lru_cache(maxsize=4)
def _probe_hub(endpoint: str) -> str | None:
    from huggingface_hub.utils import get_session

    try:
        get_session().head(endpoint, timeout=_HUB_TIMEOUT_S)
    except Exception as err:  # any transport failure means "unreachable"; the reason goes in the message
        return f"{endpoint} is unreachable ({type(err).__name__}: {err})"
    return None


@contextmanager
def hub_offline_mode() -> Iterator[None]:
    """Make ``datasets``/``huggingface_hub`` read only their local caches while inside the block.

    Both libraries read ``HF_HUB_OFFLINE`` once at import, so the environment variable alone is too late;
    their module flags are switched and restored instead.
    """
    import datasets
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = saved


def file_sha256(path: Path) -> str:
    """sha256 of a file's content, remembered in ``<home>/hashes/`` keyed by path, size and mtime.

    Model files are hundreds of MB; hashing them on every run would cost seconds for nothing.
    """
    path = Path(path).resolve()
    stat = path.stat()
    stamp = {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    sidecar = sae_lightning_home() / "hashes" / (hashlib.sha1(str(path).encode()).hexdigest() + ".json")
    try:
        saved = json.loads(sidecar.read_text())
        if {k: saved.get(k) for k in stamp} == stamp:
            return saved["sha256"]
    except (OSError, ValueError, KeyError):
        pass
    digest = sha256_file(path)
    with contextlib.suppress(OSError):  # best effort: a read-only home only costs a re-hash next time
        sidecar.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(sidecar, {**stamp, "sha256": digest})
    return digest


# ---------------------------------------------------------------- documents

def resolve_text_files(path: str) -> list[Path]:
    """``path`` as a file, a directory (its ``*.txt``, sorted) or a glob; errors name what is wrong."""
    expanded = os.path.expanduser(path)
    if os.path.isdir(expanded):
        files = sorted(Path(expanded).glob("*.txt"))
        if not files:
            raise MissingFileError(f"data.path={path!r} is a directory without .txt files; "
                                   "point data.path at a .txt file, a directory of them or a glob")
    elif os.path.isfile(expanded):
        files = [Path(expanded)]
    else:
        files = [Path(p) for p in sorted(glob.glob(expanded, recursive=True)) if os.path.isfile(p)]
        if not files:
            raise MissingFileError(f"data.path={path!r} matches no file (relative to {os.getcwd()}); "
                                   f"give an existing .txt file, directory or glob, or {LOCAL_DATA_PRESET}")
    for f in files:
        if f.stat().st_size == 0:
            raise DataError(f"Text file {f} is empty; remove it from data.path or fill it")
    return files


def read_documents(path: Path, separator: str | None) -> Iterator[str]:
    """Stream the documents of one UTF-8 file, split on ``separator`` and stripped; empty ones skipped.
    Without a separator the whole file is one document (read into memory: give big corpora a separator)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, pending = 0, ""
    with path.open("rb") as f:
        while True:
            chunk = f.read(_READ_CHUNK_BYTES)
            text = _decode(decoder, chunk, offset, path, final=not chunk)
            offset += len(chunk)
            pieces = (pending + text).split(separator) if separator is not None else [pending + text]
            pending = pieces.pop()
            yield from (doc for doc in map(str.strip, pieces) if doc)
            if not chunk:
                break
    if pending.strip():
        yield pending.strip()


def _decode(decoder: codecs.IncrementalDecoder, chunk: bytes, offset: int, path: Path, final: bool) -> str:
    held = len(decoder.getstate()[0])  # bytes of a split character carried over from the last chunk
    try:
        return decoder.decode(chunk, final=final)
    except UnicodeDecodeError as err:
        at = offset - held + err.start
        raise DataError(f"Text file {path} is not valid UTF-8: byte 0x{err.object[err.start]:02x} at byte "
                         f"offset {at}; re-encode it, e.g. `iconv -f latin1 -t utf-8 {path} > fixed.txt`"
                         ) from None


def iter_documents(cfg: DataConfig) -> Iterator[str]:
    """The documents of ``cfg``'s source, in a fixed order."""
    if cfg.source == "files":
        if not cfg.path:
            raise ConfigError("data.source=files needs data.path=<file, directory or glob of .txt files>")
        if cfg.separator == "":
            raise ConfigError("data.separator='' cannot split documents; give the string between them, "
                              "e.g. data.separator='<|endoftext|>', or data.separator=null for one document "
                              "per file")
        for f in resolve_text_files(cfg.path):
            yield from read_documents(f, cfg.separator)
    elif cfg.source == "hub":
        yield from _hub_documents(cfg)
    else:
        raise ConfigError(f"Unknown data.source={cfg.source!r}: choose hub or files")


def _hub_documents(cfg: DataConfig) -> Iterator[str]:
    for i, row in enumerate(_open_hub_dataset(cfg)):
        if i == 0 and cfg.text_column not in row:
            raise ConfigError(f"Dataset {cfg.name!r} has no column data.text_column={cfg.text_column!r}; "
                              f"its columns are {sorted(row)}")
        yield row[cfg.text_column]


def _open_hub_dataset(cfg: DataConfig) -> Iterable[dict[str, Any]]:
    """Stream the dataset from the hub; offline, fall back to the local ``datasets`` cache or fail fast."""
    import datasets

    reason = hub_offline_reason()
    if reason is None:
        return datasets.load_dataset(cfg.name, split=cfg.split, streaming=True)
    if _in_datasets_cache(cfg.name):
        with hub_offline_mode():
            return datasets.load_dataset(cfg.name, split=cfg.split).to_iterable_dataset()
    raise DatasetUnavailableError(
        f"Cannot stream dataset {cfg.name!r} (split {cfg.split!r}) from the Hugging Face hub: {reason}, and "
        f"it is not in the local datasets cache {datasets.config.HF_DATASETS_CACHE}. Use {LOCAL_DATA_PRESET} "
        "(the local TinyStories sample) or data=text data.path=<your .txt files>.")


def _in_datasets_cache(name: str) -> bool:
    """Whether ``datasets`` holds a prepared copy of ``name`` (its own layout: ``owner___name/*/*/*``)."""
    import datasets

    owner_and_name = name.split("/")
    owner_and_name[-1] = datasets.naming.camelcase_to_snakecase(owner_and_name[-1])
    root = Path(datasets.config.HF_DATASETS_CACHE) / "___".join(owner_and_name)
    return any(p.is_dir() for p in root.glob("*/*/*"))


def text_fingerprint(cfg: DataConfig) -> str:
    """sha256 naming the data source: files by their order, sizes and content; hub by name/split/column.

    Tokenizer, context size and token count are not included: the cache key holds them separately.
    """
    if cfg.source == "files":
        files = resolve_text_files(cfg.path or "")
        ident: dict[str, Any] = {"source": "files", "separator": cfg.separator,
                                 "files": [[f.stat().st_size, file_sha256(f)] for f in files]}
    else:
        ident = {"source": "hub", "name": cfg.name, "split": cfg.split, "column": cfg.text_column}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------- tokens

def tokenizer_adds_bos(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` puts BOS first when it encodes text with its special tokens (Gemma, LLaMA: yes;
    GPT-2, Pythia: no; Qwen2.5: it has no BOS)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos and tokenizer("a", add_special_tokens=False)["input_ids"][:1] != [bos]


def resolve_prepend_bos(prepend_bos: bool | str, tokenizer: Any) -> bool:
    """``data.prepend_bos`` as a bool: ``auto`` prepends BOS exactly when the tokenizer itself does, so each
    model sees rows the way it was trained (Gemma needs its BOS; Pythia and GPT-2 were trained without)."""
    return tokenizer_adds_bos(tokenizer) if prepend_bos == "auto" else bool(prepend_bos)


def _special_ids(tokenizer: Any, prepend_bos: bool | str) -> tuple[int | None, int]:
    name = getattr(tokenizer, "name_or_path", type(tokenizer).__name__)
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"Tokenizer {name!r} has no EOS token to separate documents; "
                          "use a tokenizer with an eos_token (or set tokenizer.eos_token)")
    prepend_bos = resolve_prepend_bos(prepend_bos, tokenizer)
    if prepend_bos and tokenizer.bos_token_id is None:
        raise ConfigError(f"Tokenizer {name!r} has no BOS token but data.prepend_bos=true; "
                          "set data.prepend_bos=false (or auto)")
    return (tokenizer.bos_token_id if prepend_bos else None), tokenizer.eos_token_id


def _text_chunks(docs: Iterable[str]) -> Iterator[list[str]]:
    """Group documents for one tokenizer call each: small groups first (the first batch comes quickly),
    doubling up to ``_TOKENIZE_CHARS`` characters (large calls keep every core busy)."""
    group: list[str] = []
    size, target = 0, _FIRST_TOKENIZE_CHARS
    for doc in docs:
        group.append(doc)
        size += len(doc)
        if size >= target:
            yield group
            group, size, target = [], 0, min(2 * target, _TOKENIZE_CHARS)
    if group:
        yield group


def pack_rows(docs: Iterable[str], tokenizer: Any, context_size: int, prepend_bos: bool | str
              ) -> Iterator[np.ndarray]:
    """Blocks of packed rows ``[n, context_size]`` (int64); text left over for a partial row is dropped.
    ``prepend_bos``: true, false or ``auto`` (:func:`resolve_prepend_bos`)."""
    bos, eos = _special_ids(tokenizer, prepend_bos)
    body = context_size if bos is None else context_size - 1
    carry = np.empty(0, dtype=np.int64)
    for texts in _text_chunks(docs):
        stream: list[int] = []
        for ids in tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]:
            stream.extend(ids)
            stream.append(eos)
        joined = np.concatenate([carry, np.asarray(stream, dtype=np.int64)])
        n = len(joined) // body
        carry = joined[n * body:]
        if n:
            rows = joined[: n * body].reshape(n, body)
            yield rows if bos is None else np.concatenate([np.full((n, 1), bos, np.int64), rows], axis=1)


def iter_token_batches(cfg: DataConfig, tokenizer: Any, batch_size: int) -> Iterator[torch.Tensor]:
    """LongTensor batches ``[batch_size, cfg.context_size]`` until ``cfg.n_tokens``, rounded up to a batch.

    If the source runs out first, the rows made so far are yielded (the last batch may be smaller) with a
    warning; a source too short for a single row is an error.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size={batch_size} must be > 0")
    pending: list[np.ndarray] = []
    n_pending = n_done = 0
    for block in pack_rows(iter_documents(cfg), tokenizer, cfg.context_size, cfg.prepend_bos):
        pending.append(block)
        n_pending += len(block)
        while n_pending >= batch_size and n_done < cfg.n_tokens:
            rows = np.concatenate(pending)
            yield torch.from_numpy(rows[:batch_size].copy())
            pending, n_pending = [rows[batch_size:]], n_pending - batch_size
            n_done += batch_size * cfg.context_size
        if n_done >= cfg.n_tokens:
            return
    if n_pending:
        yield torch.from_numpy(np.concatenate(pending))
        n_done += n_pending * cfg.context_size
    if n_done == 0:
        raise DataError(f"Data source {_describe(cfg)} holds fewer than data.context_size="
                         f"{cfg.context_size} tokens; give more text or a smaller context_size")
    warnings.warn(f"Data source {_describe(cfg)} ran out after {n_done} tokens, before "
                  f"data.n_tokens={cfg.n_tokens}", stacklevel=2)


def _describe(cfg: DataConfig) -> str:
    return f"data.path={cfg.path!r}" if cfg.source == "files" else f"dataset {cfg.name!r} split {cfg.split!r}"


def special_token_ids(tokenizer: Any) -> list[int]:
    """Sorted ids of BOS/EOS/PAD and every other special token."""
    ids = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, *tokenizer.all_special_ids}
    ids.discard(None)
    return sorted(ids)


def special_token_mask(tokens: torch.Tensor, tokenizer: Any) -> torch.Tensor:
    """Bool mask, same shape as ``tokens``: True at BOS/EOS/PAD and every other special token id."""
    ids = special_token_ids(tokenizer)
    return torch.isin(tokens, torch.tensor(ids, dtype=tokens.dtype, device=tokens.device))
