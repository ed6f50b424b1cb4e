#!/bin/sh
# Install what the fault-injection harness needs: iproute2 (ip netns, tc),
# iptables, and libfaketime (the `faketime` package, for the clock-skew
# nemesis).  Safe to run repeatedly; does nothing when all are present.
# Needs root (apt-get); used by `jepsen/run` and callable from a Makefile.
set -eu

missing=""
command -v ip >/dev/null 2>&1 || missing="$missing iproute2"
command -v tc >/dev/null 2>&1 || missing="$missing iproute2"
command -v iptables >/dev/null 2>&1 || missing="$missing iptables"
found_faketime=""
for lib in /usr/lib/*/faketime/libfaketimeMT.so.1 /usr/lib/faketime/libfaketimeMT.so.1 \
           /usr/local/lib/faketime/libfaketimeMT.so.1; do
    [ -e "$lib" ] && found_faketime=1
done
[ -n "$found_faketime" ] || missing="$missing faketime"

if [ -z "$missing" ]; then
    exit 0
fi

# shellcheck disable=SC2086
set -- $(printf '%s\n' $missing | sort -u)
echo "jepsen/setup.sh: installing $*" >&2
if ! command -v apt-get >/dev/null 2>&1; then
    echo "jepsen/setup.sh: apt-get not found; install $* by hand" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >&2
apt-get install -y -qq "$@" >&2
