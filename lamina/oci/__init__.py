"""OCI types, layer tar streams, image layout/tarball, registry client.

Knows nothing of Dockerfiles, sandboxes or the cache index.
"""
