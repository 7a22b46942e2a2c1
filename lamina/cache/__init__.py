"""The content-addressed store, the cache index and garbage collection.

Knows nothing of Dockerfiles; may use `lamina.oci` types.
"""
