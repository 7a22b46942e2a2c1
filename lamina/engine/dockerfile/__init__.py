"""The Dockerfile front end: pure functions from text to typed instructions.

Owns parsing, shell-word expansion and .dockerignore matching. It reads
text it is given and nothing else: no files, sandbox, cache or OCI imports.
"""
