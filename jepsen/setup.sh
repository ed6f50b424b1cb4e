#!/bin/sh
# Install what the fault-injection harness needs (iproute2, iptables,
# libfaketime): the test suite's one setup script installs them, with the
# rest of what the tests need.  Needs root; used by `make jepsen-soak`.
set -eu
exec sh "$(dirname "$0")/../tests/setup-system.sh"
