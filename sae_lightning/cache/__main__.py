"""Cache command line.

    python -m sae_lightning.cache build [hydra overrides, as for train.py]   build (or reuse) the caches
    python -m sae_lightning.cache list [--root DIR]                          caches present: size and key
    python -m sae_lightning.cache verify [--root DIR] [CACHE_DIR ...]        hash every shard now
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from ..console import user_errors_as_messages
from .build import PARTIAL_DIR
from .ensure import ensure_cache
from .reader import META, ActivationCache, CacheError

DEFAULT_CONF = Path(__file__).resolve().parents[2] / "conf"


def default_root() -> Path:
    """Where ``conf/activations/lm.yaml`` puts caches when nothing is overridden."""
    return Path(os.environ.get("SAE_LIGHTNING_CACHE", ".cache/activations"))


def build(overrides: list[str], config_dir: Path) -> int:
    """Compose the train.py config with ``overrides`` and ensure its caches exist."""
    from hydra import compose, initialize_config_dir

    from ..config import register_configs, to_config

    if not (config_dir / "train.yaml").is_file():
        raise SystemExit(f"no train.yaml in {config_dir}: run from the repository or pass --config-dir")
    register_configs()
    with initialize_config_dir(str(config_dir.resolve()), version_base="1.3"):
        cfg = to_config(compose("train", overrides=overrides))
    for cache in ensure_cache(cfg):
        print(f"{cache.path}  rows={cache.n_rows} d={cache.d} dtype={cache.dtype} "
              f"norm_scale={cache.norm_scale:.4g}")
    return 0


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def list_caches(root: Path) -> int:
    """Print every finished cache under ``root`` (size, rows, key) and any interrupted builds."""
    done = sorted(p for p in root.glob("*/" + META))
    for meta_path in done:
        meta = json.loads(meta_path.read_text())
        size = sum(s["bytes"] for s in meta["shards"])
        print(f"{meta_path.parent.name}\n  {_human_bytes(size)}, {meta['n_rows']} rows x {meta['d']} "
              f"{meta['dtype']}, {len(meta['shards'])} shards, norm_scale={meta['norm_scale']:.4g}\n"
              f"  key: {json.dumps(meta['key'], sort_keys=True)}")
    for progress in sorted((root / PARTIAL_DIR).glob("*/progress.json")):
        shards = json.loads(progress.read_text())["shards"]
        print(f"{progress.parent.name}  (interrupted build: {len(shards)} complete shards; "
              "the next build of this key resumes it)")
    if not done:
        print(f"no finished caches under {root}")
    return 0


def verify(root: Path, paths: list[Path]) -> int:
    """Hash every shard of the given caches (default: all under ``root``); exit 1 if any fails."""
    targets = paths or sorted(p.parent for p in root.glob("*/" + META))
    bad = 0
    for path in targets:
        try:
            ActivationCache(path).verify()
            print(f"ok   {path}")
        except (CacheError, OSError) as err:
            bad += 1
            print(f"FAIL {path}: {err}")
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sae_lightning.cache", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p_build = sub.add_parser("build", help="build or reuse the caches a train.py config asks for")
    p_build.add_argument("overrides", nargs="*", help="Hydra overrides as for train.py, e.g. layer=6")
    p_build.add_argument("--config-dir", type=Path, default=DEFAULT_CONF)
    for name, text in (("list", "list caches with size and key"), ("verify", "checksum every shard")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--root", type=Path, default=default_root(), help="cache root (activations.cache_dir)")
    sub.choices["verify"].add_argument("paths", nargs="*", type=Path, help="cache directories (default: all)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "build":
        from hydra.errors import CompactHydraException

        with user_errors_as_messages(CompactHydraException):  # a bad override too, as train.py prints it
            return build(args.overrides, args.config_dir)
    if args.command == "list":
        return list_caches(args.root)
    return verify(args.root, args.paths)


if __name__ == "__main__":
    sys.exit(main())
