#!/bin/sh
# Start dockerd for tests/test_sandbox_isolation.py's build inside `docker run`,
# unless one already answers. As ../shared/bench/peers-setup.sh does: no bridge
# and no iptables (the test's container runs with --network=none). Run as root.
set -eu
docker info >/dev/null 2>&1 && exit 0
mkdir -p /var/lib/docker
setsid dockerd --iptables=false --ip-forward=false --ip-masq=false --bridge=none \
  --pidfile /run/lamina-test-dockerd.pid >/var/log/lamina-test-dockerd.log 2>&1 </dev/null &
i=0
while [ "$i" -lt 120 ]; do
  docker info >/dev/null 2>&1 && exit 0
  sleep 0.5
  i=$((i + 1))
done
echo "dockerd did not come up in 60 s: see /var/log/lamina-test-dockerd.log" >&2
exit 1
