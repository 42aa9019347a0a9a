"""The ``grokviz`` command line.

::

    grokviz inspect PATH [--plan] [--devices 8 | --mesh 1x8] [--dtype int8]
    grokviz inspect --plan grok-1 --devices 8 --dtype int8      # plan for a preset, no checkpoint needed
    grokviz convert SRC DST [--config JSON] [--overwrite] [--shard-gb 4]
    grokviz verify PATH [--manifest FILE]
    grokviz manifest PATH [-o FILE]
    grokviz train ...                                           # see grokviz.train
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

PRESETS = {"grok-1": "grok1", "grok1": "grok1", "tiny": "tiny"}


def _mesh_shape(args) -> tuple[int, int]:
    if args.mesh:
        data, _, model = args.mesh.lower().partition("x")
        return int(data), int(model)
    return 1, int(args.devices)


def _fmt_bytes(n: int) -> str:
    return f"{n:,} B ({n / 1e9:.2f} GB)"


def cmd_inspect(args) -> int:
    from .config import GrokConfig
    from .checkpoint.converted import inspect
    from .checkpoint.config_io import as_config
    from .sharding import plan_memory

    cfg = None
    if args.path in PRESETS and not Path(args.path).exists():
        cfg = getattr(GrokConfig, PRESETS[args.path])()
        print(f"preset: {cfg.describe()}")
    else:
        info = inspect(args.path)
        cfg = info["config"]
        if cfg is None and args.config:
            cfg = as_config(args.config)
        print(f"path:       {info['path']}")
        print(f"format:     {info['format']}")
        if "inferred" in info:
            print(f"inferred:   {info['inferred']}")
        print(f"config:     {cfg.describe() if cfg else 'not Grok-1 sized; pass --config to name the head split'}")
        if cfg is not None:
            from .checkpoint.converted import _count

            print(f"parameters: {info['num_params'] or _count(cfg):,}")
        if "dtypes" in info:
            print("dtypes:     " + ", ".join(f"{k}: {v:,} elements" for k, v in sorted(info["dtypes"].items())))
            print(f"tensors:    {info['tensors']} ({_fmt_bytes(info['tensor_bytes'])})")
        print(f"files:      {info['files']} ({_fmt_bytes(info['file_bytes'])})")
    if args.plan:
        if cfg is None:
            print("cannot plan without a config (pass --config)", file=sys.stderr)
            return 2
        plan = plan_memory(cfg, _mesh_shape(args), args.dtype)
        print(plan.table())
    return 0


def cmd_convert(args) -> int:
    from .checkpoint.converted import DEFAULT_SHARD_BYTES, convert

    shard = int(args.shard_gb * 1e9) if args.shard_gb else DEFAULT_SHARD_BYTES
    dst = convert(args.src, args.dst, config=args.config, overwrite=args.overwrite, max_shard_bytes=shard,
                  progress=not args.quiet)
    print(f"wrote {dst}")
    return 0


def cmd_verify(args) -> int:
    from .checkpoint.converted import is_converted, verify
    from .checkpoint.manifest import verify_release
    from .checkpoint.release import is_release, scan_release

    if is_converted(args.path):
        ok = verify(args.path)
        print(f"OK: {len(ok)} files match their recorded SHA-256")
        return 0
    if is_release(args.path):
        got = verify_release(args.path, args.manifest)
        if got:
            print(f"OK: {len(got)} files match the manifest")
        else:
            print("no manifest found (MANIFEST.sha256, or --manifest FILE); checked file set and sizes only")
        if args.config:
            from .checkpoint.config_io import as_config

            scan_release(args.path, as_config(args.config))
            print("OK: file set and sizes fit the config")
        return 0
    print(f"{args.path}: not a checkpoint", file=sys.stderr)
    return 2


def cmd_manifest(args) -> int:
    from .checkpoint.manifest import format_manifest, manifest

    text = format_manifest(manifest(args.path, progress=not args.quiet))
    if args.output:
        Path(args.output).write_text(text)
        print(f"wrote {args.output}")
    else:
        sys.stdout.write(text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="grokviz", description="grokviz checkpoint tools")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("inspect", help="format, config, parameter count, dtypes, bytes (and a memory plan)")
    s.add_argument("path", help="checkpoint directory, or a preset name (grok-1, tiny) for --plan")
    s.add_argument("--plan", action="store_true", help="print the per-device memory plan")
    s.add_argument("--devices", type=int, default=8, help="devices on the model axis (mesh 1 x N)")
    s.add_argument("--mesh", help="mesh shape DATAxMODEL, e.g. 2x4 (overrides --devices)")
    s.add_argument("--dtype", default="int8", choices=["int8", "bf16", "fp32"])
    s.add_argument("--config", help="config JSON (file or string) when the checkpoint does not record one")
    s.set_defaults(fn=cmd_inspect)

    s = sub.add_parser("convert", help="release checkpoint -> safetensors shards + index + config")
    s.add_argument("src")
    s.add_argument("dst")
    s.add_argument("--config", help="config JSON (file or string); default: Grok-1 when the shapes match")
    s.add_argument("--overwrite", action="store_true")
    s.add_argument("--shard-gb", type=float, default=None)
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(fn=cmd_convert)

    s = sub.add_parser("verify", help="check every file against its recorded SHA-256")
    s.add_argument("path")
    s.add_argument("--manifest", help="sha256sum-style manifest for a release directory")
    s.add_argument("--config", help="also check a release's file set and sizes against this config")
    s.set_defaults(fn=cmd_verify)

    s = sub.add_parser("manifest", help="SHA-256 of every file (sha256sum format)")
    s.add_argument("path")
    s.add_argument("-o", "--output")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(fn=cmd_manifest)
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "train":
        try:
            from .train import cli_main
        except ImportError as e:
            print(f"grokviz train is not available: could not import grokviz.train.cli_main ({e})", file=sys.stderr)
            return 2
        return cli_main(argv[1:]) or 0
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, OSError) as e:
        print(f"grokviz {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
