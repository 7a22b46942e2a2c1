"""The build engine: front end, planner, context, executor, sandbox, snapshots.

The executor is the only module that joins the front end, the cache and the
OCI formats. Nothing here imports `lamina.cli` or `lamina.api`.
"""
