"""One module per kind of build step (run, copy/add, metadata)."""
