#!/bin/sh
# As root: make sure Debian's qemu-user-static handlers are registered with binfmt_misc,
# as installing the package does on a host (binfmt-support's postinst). Run by README's
# test command (and so by .ci/run) after the install, for where the install could not
# register them: a container whose /proc/sys/fs/binfmt_misc was not mounted, or packages
# installed before. Debian registers them with the F (fix-binary) flag, which rootless
# sandboxes need. lamina itself never registers host handlers
# (lamina/engine/sandbox/emulation.py).
set -eu
dir=/proc/sys/fs/binfmt_misc
[ -e "$dir/register" ] || mount -t binfmt_misc binfmt_misc "$dir"
if command -v update-binfmts >/dev/null 2>&1; then
    update-binfmts --enable 2>/dev/null || true  # each imported format; some may be on already
fi
# Whatever is still missing, from the package's systemd-binfmt rules.
for conf in /usr/lib/binfmt.d/qemu-*.conf; do
    [ -e "$conf" ] || continue
    name=$(cut -d: -f2 "$conf")
    [ -e "$dir/$name" ] || cat "$conf" >"$dir/register"
done
[ -e "$dir/qemu-aarch64" ] || { echo "binfmt.sh: qemu-aarch64 is not registered (apt-get install qemu-user-static)" >&2; exit 1; }
