#!/bin/sh
# check FILE...: each file must exist and not be empty; prints its size.
status=0
for f in "$@"; do
    if [ -s "$f" ]; then
        echo "ok $f $(wc -c < "$f")"
    else
        echo "empty or missing: $f" >&2
        status=1
    fi
done
exit $status
