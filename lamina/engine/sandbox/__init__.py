"""Rootless sandbox: Linux namespaces, overlay mounts, process execution.

Knows nothing of Dockerfiles or of the cache index; it is given lower
directories, an upper directory and a process spec.
"""
