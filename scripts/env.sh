# The process settings grokviz runs best with (why and measurements: grokviz/runtime.py).
#   source scripts/env.sh            # in a bash script or shell: export them (scripts/lab.sh, scripts/test.sh)
#   bash scripts/env.sh CMD [ARG...] # run one command with them, e.g. bash scripts/env.sh .venv/bin/python bench/bench_forward.py
# glibc malloc tunables, read by glibc when a process starts: big blocks from the heap instead of fresh mmaps,
# freed memory kept for the next call (2 GiB trim threshold, 256 MiB top pad), transparent huge pages for what
# is still faulted (glibc >= 2.35; older ones ignore it). Each is added to GLIBC_TUNABLES unless already set
# there, so a value of your own wins. Keep the list equal to grokviz.runtime.TUNABLES (tests/test_runtime.py).
for _grokviz_tunable in glibc.malloc.mmap_max=0 glibc.malloc.trim_threshold=2147483647 \
    glibc.malloc.top_pad=268435456 glibc.malloc.hugetlb=1; do
  case ":${GLIBC_TUNABLES:-}" in
    *:"${_grokviz_tunable%%=*}"=*) ;;
    *) GLIBC_TUNABLES="${GLIBC_TUNABLES:+$GLIBC_TUNABLES:}$_grokviz_tunable" ;;
  esac
done
unset _grokviz_tunable
export GLIBC_TUNABLES
if [ "${BASH_SOURCE[0]:-}" = "$0" ] && [ "$#" -gt 0 ]; then  # executed with a command, not sourced
  exec "$@"
fi
