"""The ``grokviz`` command line.

::

    grokviz inspect PATH [--plan] [--devices 8 | --mesh 1x8] [--dtype int8]
    grokviz inspect --plan grok-1 --devices 8 --dtype int8      # plan for a preset, no checkpoint needed
    grokviz inspect --plan grok-1 --hosts 2 --devices 8         # 2 hosts x 8 devices: mesh (2, 8), per host too
    grokviz convert SRC DST [--config JSON] [--overwrite] [--shard-gb 4]   # SRC: release or Hugging Face folder
    grokviz verify PATH [--manifest FILE] [--config JSON]
    grokviz manifest PATH [--write | -o FILE]
    grokviz train ...                                           # see grokviz.train
    grokviz generate MODEL "prompt" --max-new-tokens N --temperature T [--top-p P --top-k K --seed S --routing]
    grokviz study SPEC [--restart] [--quiet]                    # a routing study job (grokviz.study)
    grokviz launch -n 2 --devices-per-process 4 -- grokviz study SPEC   # N local CPU processes of one JAX job

A converted checkpoint verifies against its own index (SHA-256 and size of every file). The release format
records no hashes and cannot itself detect two same-shaped tensors swapped between files (each pickle holds only
its array): ``grokviz manifest PATH --write`` records ``MANIFEST.sha256`` next to ``ckpt-0/`` on a trusted copy,
and ``grokviz verify`` / ``gv.load(..., verify=True)`` check against it later. Without a manifest, ``verify
--config`` can still check a release's file set, sizes and tensor shapes against a config; with neither there is
nothing to verify against and ``verify`` fails.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

PRESETS = {"grok-1": "grok1", "grok1": "grok1", "golden": "golden"}  # config presets `grokviz inspect` knows by name
INDEX_NAME = "model.safetensors.index.json"


def _mesh_shape(args) -> tuple[int, int]:
    if args.mesh:
        data, _, model = args.mesh.lower().partition("x")
        return int(data), int(model)
    return int(getattr(args, "hosts", 1) or 1), int(args.devices)


def _fmt_bytes(n: int) -> str:
    return f"{n:,} B ({n / 1e9:.2f} GB)"


def cmd_inspect(args) -> int:
    from .checkpoint.config_io import as_config
    from .checkpoint.converted import inspect
    from .checkpoint.hf import HFFolder, is_hf
    from .config import GrokConfig
    from .sharding import plan_memory

    cfg = None
    if args.path in PRESETS and not Path(args.path).exists():
        cfg = getattr(GrokConfig, PRESETS[args.path])()
        print(f"preset: {cfg.describe()}")
    elif is_hf(args.path):
        info = HFFolder(args.path).summary()
        cfg = info["config"]
        import numpy as np

        from .params import shapes_dict

        sd = shapes_dict(cfg)
        nparams = sum(int(np.prod(s)) for s in [*(v for k, v in sd.items() if k != "blocks"), *sd["blocks"].values()])
        print(f"path:       {info['path']}")
        print(f"format:     {info['format']}")
        print(f"family:     {info['family']}")
        print(f"config:     {cfg.describe()}")
        print(f"parameters: {nparams:,}")
        print("dtypes:     " + ", ".join(f"{k}: {v:,} elements" for k, v in sorted(info["dtypes"].items())))
        print(f"tensors:    {info['tensors']} ({_fmt_bytes(info['tensor_bytes'])})")
        print(f"files:      {info['files']} shard(s) ({_fmt_bytes(info['file_bytes'])})")
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
        if args.hosts > 1:
            from .sharding import host_table

            print(host_table(plan, args.hosts))
    return 0


def cmd_convert(args) -> int:
    from .checkpoint.converted import DEFAULT_SHARD_BYTES, convert
    from .checkpoint.hf import HFFolder, is_hf

    shard = int(args.shard_gb * 1e9) if args.shard_gb else DEFAULT_SHARD_BYTES
    if is_hf(args.src):
        from .checkpoint.config_io import as_config
        from .checkpoint.converted import write_checkpoint

        hf = HFFolder(args.src, as_config(args.config) if args.config else None)
        stream = ((n, layer, v) for n, layer, v, _ in hf.tensors(progress=not args.quiet))
        dst = write_checkpoint(args.dst, hf.cfg, stream, overwrite=args.overwrite, max_shard_bytes=shard,
                               tokenizer=hf.tokenizer)
        print(f"wrote {dst} ({hf.cfg.family}, stored dtype {hf.dtype}"
              f"{', with its tokenizer.json' if hf.tokenizer is not None else ''})")
        return 0
    dst = convert(args.src, args.dst, config=args.config, overwrite=args.overwrite, max_shard_bytes=shard,
                  progress=not args.quiet)
    print(f"wrote {dst}")
    return 0


def cmd_verify(args) -> int:
    from .checkpoint.converted import is_converted, read_index, verify
    from .checkpoint.hf import HFFolder, is_hf
    from .checkpoint.manifest import NoManifestError, find_manifest, verify_release
    from .checkpoint.release import is_release, iter_release

    if is_hf(args.path):  # before is_converted: a sharded HF folder has a model.safetensors.index.json too
        hf = HFFolder(args.path)
        print(f"OK: {hf.cfg.family} config read; {len(hf.headers)} shard(s) present with valid headers that match "
              f"the index")
        print(f"OK: all {len(hf.want)} tensors the config implies are present, with the expected shapes and dtypes, "
              f"and no other")
        print("note: a Hugging Face folder records no hashes; values were not checked")
        return 0
    if is_converted(args.path):
        ok = verify(args.path)
        wm = read_index(args.path)["weight_map"]
        print(f"OK: {len(ok)} files match their recorded SHA-256 and size: {', '.join(ok)}")
        print(f"OK: {len(set(wm.values()))} shard(s) hold exactly the {len(wm)} tensors the index names")
        return 0
    if not is_release(args.path):
        print(f"grokviz verify: error: {args.path}: not a checkpoint (no {INDEX_NAME}, no ckpt-0/tensor*_000)",
              file=sys.stderr)
        return 2
    missing_manifest = None
    try:
        got = verify_release(args.path, args.manifest)
        print(f"OK: {len(got)} files match {args.manifest or find_manifest(args.path)}")
    except NoManifestError as e:
        missing_manifest = str(e)
    if args.config:
        from .checkpoint.config_io import as_config

        cfg = as_config(args.config)
        n = sum(1 for _ in iter_release(args.path, cfg, progress=not args.quiet))
        print(f"OK: all {n} tensor files present, sized and read with the shapes config {cfg.name!r} expects")
    if missing_manifest is not None:
        if not args.config:
            print(f"grokviz verify: error: {missing_manifest}; or pass --config JSON to check the file set, sizes "
                  f"and shapes", file=sys.stderr)
            return 1
        print("no manifest: contents were not checked against recorded hashes (a changed value, or two "
              "same-shaped tensors swapped between files, would pass)")
    return 0


def cmd_manifest(args) -> int:
    from .checkpoint.fsutil import write_file_atomic
    from .checkpoint.manifest import format_manifest, manifest, write_manifest

    if args.write:
        out = write_manifest(args.path, progress=not args.quiet)
        print(f"wrote {out}")
        return 0
    text = format_manifest(manifest(args.path, progress=not args.quiet))
    if args.output:
        write_file_atomic(Path(args.output), text.encode())
        print(f"wrote {args.output}")
    else:
        sys.stdout.write(text)
    return 0


def cmd_study(args) -> int:
    from . import distributed as dist

    info = dist.initialize()
    from . import study

    spec = study.load_spec(args.spec)
    if args.restart and info.process_id == 0:
        spec.progress.unlink(missing_ok=True)
    log = print if info.process_id == 0 and not args.quiet else None
    if log:
        print(f"grokviz study: {info}; results -> {spec.output}", flush=True)
    try:
        res = study.run(spec, progress=not args.quiet, log=(lambda m: print(m, flush=True)) if log else None)
    except RuntimeError as e:
        print(f"grokviz study: error: {e}", file=sys.stderr, flush=True)
        return 1
    if log and res.routing is not None:
        print(f"grokviz study: {res.routing.n_tokens:,} tokens; wrote {spec.output}", flush=True)
    return 0


def cmd_launch(args) -> int:
    from .distributed.launch import launch

    command = args.command_line[1:] if args.command_line[:1] == ["--"] else args.command_line
    return launch(command, args.n, devices_per_process=args.devices_per_process, grace=args.grace,
                  join_timeout=args.join_timeout, timeout=args.timeout, heartbeat=args.heartbeat,
                  cpus_per_process=args.cpus_per_process)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="grokviz", description="grokviz checkpoint tools")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("inspect", help="format, config, parameter count, dtypes, bytes (and a memory plan)")
    s.add_argument("path", help="checkpoint directory, or a preset name (grok-1, golden) for --plan")
    s.add_argument("--plan", action="store_true", help="print the per-device memory plan")
    s.add_argument("--devices", type=int, default=8, help="devices on the model axis (mesh 1 x N; with --hosts H: "
                   "devices per host, mesh H x N)")
    s.add_argument("--hosts", type=int, default=1, help="hosts (processes) the data axis spans: adds per-host memory "
                   "and the checkpoint bytes each host reads")
    s.add_argument("--mesh", help="mesh shape DATAxMODEL, e.g. 2x4 (overrides --devices)")
    s.add_argument("--dtype", default="int8", choices=["int8", "bf16", "fp32"])
    s.add_argument("--config", help="config JSON (file or string) when the checkpoint does not record one")
    s.set_defaults(fn=cmd_inspect)

    s = sub.add_parser("convert", help="release checkpoint or Hugging Face folder -> safetensors shards + index + "
                       "config")
    s.add_argument("src")
    s.add_argument("dst")
    s.add_argument("--config", help="config JSON (file or string); default: Grok-1 when the shapes match")
    s.add_argument("--overwrite", action="store_true")
    s.add_argument("--shard-gb", type=float, default=None)
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(fn=cmd_convert)

    s = sub.add_parser("verify", help="check every file against its recorded SHA-256 (converted: the index; "
                       "release: MANIFEST.sha256 next to ckpt-0/, see `manifest --write`)",
                       description="Converted checkpoints verify against their index, which must cover every file. "
                       "A release verifies against a sha256sum-style manifest, which must cover every tensor file; "
                       "the release format itself cannot detect same-shaped tensors swapped between files, only a "
                       "manifest recorded on a trusted copy can. With no manifest, --config checks the file set, "
                       "sizes and shapes; with neither, verify fails.")
    s.add_argument("path")
    s.add_argument("--manifest", help="sha256sum-style manifest for a release directory (entries relative to the "
                   "folder holding ckpt-0/)")
    s.add_argument("--config", help="config JSON (file or string): also read every release tensor file and check "
                   "the file set, sizes and shapes against it")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(fn=cmd_verify)

    s = sub.add_parser("manifest", help="SHA-256 of every file (sha256sum format); --write records "
                       "MANIFEST.sha256 next to ckpt-0/",
                       description="Hash every file of a folder in sha256sum format. The release format cannot "
                       "itself detect two same-shaped tensors swapped between files; a manifest recorded on a "
                       "trusted copy (--write) lets `grokviz verify` and gv.load(..., verify=True) detect it later.")
    s.add_argument("path")
    out = s.add_mutually_exclusive_group()
    out.add_argument("--write", action="store_true", help="record MANIFEST.sha256 next to ckpt-0/ (atomically)")
    out.add_argument("-o", "--output", help="write the manifest to this file (atomically)")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(fn=cmd_manifest)

    s = sub.add_parser("study", help="run a routing study spec (TOML/JSON) over this job's processes, resumably",
                       description="Run the study SPEC describes (see grokviz.study.spec): data-parallel over the "
                       "processes of a jax.distributed job (grokviz launch, SLURM, ...) or in one process; progress "
                       "is checkpointed after every round and a restarted job resumes from it.")
    s.add_argument("spec")
    s.add_argument("--restart", action="store_true", help="discard the progress file and start over")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(fn=cmd_study)

    s = sub.add_parser("launch", help="start N local CPU processes of one JAX job running COMMAND",
                       description="Start N local processes (JAX_PLATFORMS=cpu, K host devices each, gloo "
                       "collectives, coordinator on 127.0.0.1 with a free port), forward their output prefixed "
                       "[p<i>], and fail (exit 1, naming the process and its phase) grace seconds after a process "
                       "dies, or when one has not joined within --join-timeout. See grokviz.distributed.launch.")
    s.add_argument("-n", type=int, default=2, help="number of processes")
    s.add_argument("--devices-per-process", type=int, default=1)
    s.add_argument("--grace", type=float, default=5.0, help="seconds the others get to stop after a failure")
    s.add_argument("--join-timeout", type=float, default=90.0)
    s.add_argument("--timeout", type=float, default=None, help="wall-clock limit for the whole job")
    s.add_argument("--heartbeat", type=int, default=None, help="jax.distributed heartbeat timeout (s), default 10")
    s.add_argument("--cpus-per-process", type=int, default=None, help="pin each process to its own C cores")
    s.add_argument("command_line", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    s.set_defaults(fn=cmd_launch)

    from .generation.cli import add_parser as add_generate_parser

    add_generate_parser(sub)
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
