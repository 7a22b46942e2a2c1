"""The public Python surface: `lamina.build()`, `lamina.plan()`.

Functions here join the engine, the cache and the OCI formats; they take
every setting as an argument (no global state) and raise LaminaError.
"""

from __future__ import annotations
