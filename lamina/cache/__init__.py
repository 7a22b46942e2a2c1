"""The content-addressed store, the cache index and garbage collection.

- store.py: `Store` (blobs, unpacked layers, names, build-cache results in
  SQLite, gc) and `default_cache_root(environ)`.
- images.py: whole images in and out of the store (load, commit, save).
- statcache.py: the build context's stat cache.
- transfer.py: pull and push between a registry and the store.
- verify.py: `lamina cache verify [--repair]`: every blob, name and result
  checked against the bytes, and what a killed process tore.

Knows nothing of Dockerfiles; may use `lamina.oci` types and formats.
"""
