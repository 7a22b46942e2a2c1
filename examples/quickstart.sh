#!/bin/sh
# Build the examples' base image FROM scratch with the host's static busybox,
# then the multi-stage example on top of it, then run the result. Offline.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
lamina=${LAMINA:-$here/../.venv/bin/lamina}
busybox=${BUSYBOX:-/bin/busybox}

[ -x "$busybox" ] || { echo "quickstart: $busybox not found (apt-get install busybox-static)" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

cp -r "$here/base" "$work/base"
cp "$busybox" "$work/base/busybox"
"$lamina" build --progress plain -t lamina-test/busybox:1.35 "$work/base"
"$lamina" build --progress plain -t lamina-example/hello:latest -o type=oci,dest=hello.tar "$here/multistage"
"$lamina" build --progress quiet -t lamina-example/hello:latest "$here/multistage"
"$lamina" run --rm lamina-example/hello:latest
echo "quickstart: wrote hello.tar (an OCI archive; podman load -i hello.tar)"
