#!/bin/sh
# Install the system packages the test suite needs, as root:
#   iproute2 (ip netns, tc) and iptables  - the fault-injection scenarios (jepsen/)
#   faketime (libfaketime)                 - the clock-skew nemesis
#   bubblewrap (bwrap)                     - the command runner's sandbox tests
#   chromium, chromium-driver              - the dashboard's browser test
#   openssh-server (sshd)                  - tasksprint batch's engines over ssh
#   slurm-wlm, munge                       - tasksprint batch under Slurm (the test starts
#                                            its own munged, slurmctld and slurmd; the
#                                            packages' services are not used)
# Safe to run repeatedly; does nothing when all are present.  `make test`
# runs it when it is root; jepsen/setup.sh runs it for `make jepsen-soak`.
# Without it the tests that need a package skip, saying which.
set -eu

missing=""
command -v ip >/dev/null 2>&1 || missing="$missing iproute2"
command -v tc >/dev/null 2>&1 || missing="$missing iproute2"
command -v iptables >/dev/null 2>&1 || missing="$missing iptables"
command -v bwrap >/dev/null 2>&1 || missing="$missing bubblewrap"
[ -x /usr/bin/chromium ] || missing="$missing chromium"
[ -x /usr/sbin/sshd ] || missing="$missing openssh-server"
[ -x /usr/bin/chromedriver ] || missing="$missing chromium-driver"
command -v slurmctld >/dev/null 2>&1 || missing="$missing slurm-wlm"
command -v slurmd >/dev/null 2>&1 || missing="$missing slurm-wlm"
command -v munged >/dev/null 2>&1 || missing="$missing munge"
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
echo "tests/setup-system.sh: installing $*" >&2
if ! command -v apt-get >/dev/null 2>&1; then
    echo "tests/setup-system.sh: apt-get not found; install $* by hand" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >&2
apt-get install -y -qq "$@" >&2
