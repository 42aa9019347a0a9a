"""``python -m grokviz.kernels build [--force]``: build (or find) the fused attention kernel and say where, or
why not; exit status 0 when it is available. ``python -m grokviz.kernels info``: the same without building."""

from __future__ import annotations

import argparse
import sys

from . import build as B


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m grokviz.kernels", description=__doc__.split("\n")[0])
    p.add_argument("command", choices=("build", "info"))
    p.add_argument("--force", action="store_true", help="rebuild even if a cached library exists")
    args = p.parse_args(argv)
    cxx = B.compiler()
    if args.command == "info":
        print(f"compiler: {cxx or 'none'}")
        print(f"cache: {B.cache_root()}")
        if cxx:
            path = B.library_path(cxx)
            print(f"library: {path} ({'built' if path.exists() else 'not built'})")
        return 0
    state = B.load(rebuild=args.force)
    if state["ok"]:
        print(f"grokviz fused attention kernel: {state['path']}")
        return 0
    print(f"grokviz fused attention kernel unavailable: {state['reason']}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
