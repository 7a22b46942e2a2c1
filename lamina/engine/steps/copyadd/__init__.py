"""COPY and ADD, one module per concern.

    step.py       the build step: --from, --chown, the key, produce on a miss
    selection.py  which files a COPY writes, and the key of exactly those
    chmod.py      --chmod, octal or symbolic
    placement.py  writing a selection (or a file, a heredoc) into the upper dir
    heredoc.py    COPY <<EOF: the body expanded and written
    fetch.py      ADD <url>: the download and the file it becomes
    archive.py    ADD <local tar>: unpacked at the destination

Imports run down this list from step.py; nothing here imports the executor.
"""
