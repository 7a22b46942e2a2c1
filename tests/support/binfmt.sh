#!/bin/sh
# As root: make sure Debian's qemu-user-static handlers are registered with binfmt_misc,
# as installing the package does on a host (binfmt-support's postinst). Run by README's
# test command (and so by .ci/run) after the install, for where the install could not
# register them: a container whose /proc/sys/fs/binfmt_misc was not mounted, or packages
# installed before. Debian registers them with the F (fix-binary) flag, which rootless
# sandboxes need. lamina itself never registers host handlers
# (lamina/engine/sandbox/emulation.py).
# Where binfmt_misc cannot be mounted (an unprivileged container) it says so and goes on:
# the emulation tests then use a binfmt_misc of the sandbox's own (Linux 6.7).
set -eu
dir=/proc/sys/fs/binfmt_misc
if [ ! -e "$dir/register" ] && ! mount -t binfmt_misc binfmt_misc "$dir"; then
    echo "binfmt.sh: cannot mount binfmt_misc: nothing registered on this host" >&2
    exit 0
fi
if command -v update-binfmts >/dev/null 2>&1; then
    update-binfmts --enable 2>/dev/null || true  # each imported format; some may be on already
fi
# Whatever is still missing, from the package's systemd-binfmt rules.
for conf in /usr/lib/binfmt.d/qemu-*.conf; do
    [ -e "$conf" ] || continue
    name=$(cut -d: -f2 "$conf")
    [ -e "$dir/$name" ] || cat "$conf" >"$dir/register" || echo "binfmt.sh: cannot register $name" >&2
done
[ -e "$dir/qemu-aarch64" ] || echo "binfmt.sh: qemu-aarch64 is not registered (apt-get install qemu-user-static)" >&2
