#!/bin/sh
# The example's suite as CI runs it (the last step of README's test command):
# lamina installed from this checkout into a venv of the example's own, then the
# suite twice, each with an empty cache:
#   - as you, with four pytest-xdist workers;
#   - as root if you are not (through sudo), else as an unprivileged user
#     ($LAMINA_EXAMPLE_USER, default nobody), on one worker.
# Both run with --lamina-require-sandbox: a test that cannot get its sandbox or
# port fails rather than skips. (Where /dev/net/tun is closed to users, as on
# hosts without udev, the user's services get loopback only and their ports are
# relayed by the plugin: they still run.)
set -eu
here=$(cd "$(dirname "$0")" && pwd)
project=$(cd "$here/../.." && pwd)
user=${LAMINA_EXAMPLE_USER:-nobody}
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# Everything in one directory any user can read: the example, its venv, the caches.
work=$(mktemp -d /tmp/lamina-example-XXXXXX)
trap 'as_root rm -rf "$work"' EXIT
chmod 755 "$work"
mkdir "$work/example"
(cd "$here" && tar cf - --exclude=.venv --exclude=__pycache__ --exclude=.pytest_cache .) | (cd "$work/example" && tar xf -)
/usr/bin/python3 -m venv "$work/venv"
"$work/venv/bin/pip" install -q "$project" pytest pytest-xdist
cat > "$work/suite.sh" <<EOS
#!/bin/sh
# suite.sh DIR [pytest options]: the suite, its cache, HOME and tmp_path in DIR (removed with
# \$work: nothing left in /tmp/pytest-of-USER), from a clean environment.
set -eu
dir=\$1
shift
echo "+ pytest \$* (as \$(id -un))"
cd "$work/example"
exec env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME="\$dir" LANG=C.UTF-8 \\
    PYTHONDONTWRITEBYTECODE=1 "$work/venv/bin/python" -m pytest -q -rs -p no:cacheprovider \\
    --lamina-cache="\$dir/lamina" --basetemp="\$dir/tmp" "\$@"
EOS
chmod -R a+rX "$work"
mkdir "$work/first" "$work/second"

if [ "$(id -u)" = 0 ]; then
    sh "$work/suite.sh" "$work/first" -n 4 --lamina-require-sandbox
    chown "$user" "$work/second"
    runuser -u "$user" -- sh "$work/suite.sh" "$work/second" --lamina-require-sandbox
else
    sh "$work/suite.sh" "$work/first" -n 4 --lamina-require-sandbox
    sudo sh "$work/suite.sh" "$work/second" --lamina-require-sandbox
fi
