"""Helpers shared by lamina's tests (import as `from tests.support import ...`)."""

from tests.support.busybox import (
    BUSYBOX,
    BUSYBOX_CREATED,
    BUSYBOX_EPOCH,
    BUSYBOX_NAME,
    make_busybox_image,
    make_busybox_rootfs,
)

__all__ = [
    "BUSYBOX",
    "BUSYBOX_CREATED",
    "BUSYBOX_EPOCH",
    "BUSYBOX_NAME",
    "make_busybox_image",
    "make_busybox_rootfs",
]
