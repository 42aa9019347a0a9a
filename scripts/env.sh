# Sourced by scripts/lab.sh and scripts/test.sh: process settings grokviz runs best with (see grokviz/runtime.py).
# glibc malloc with transparent huge pages (glibc >= 2.35; ignored by older ones), added to any GLIBC_TUNABLES.
case ":${GLIBC_TUNABLES:-}:" in
  *:glibc.malloc.hugetlb=*) ;;
  *) export GLIBC_TUNABLES="${GLIBC_TUNABLES:+$GLIBC_TUNABLES:}glibc.malloc.hugetlb=1" ;;
esac
