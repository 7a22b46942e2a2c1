#!/bin/sh
# hello: prints a greeting and the version it was built with.
echo "hello from lamina @VERSION@, ${1:-world}"
