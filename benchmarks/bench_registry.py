"""Pull and push throughput against Debian's docker-registry on 127.0.0.1.

    .venv/bin/python benchmarks/bench_registry.py [--size-mb 100] [--layers 4] [--repeat 3]

Makes an image of incompressible layers (gzip level 1 over random bytes, so
blob size ~= --size-mb) straight in a throwaway store, then times:
  - lamina push (monolithic PUT) and chunked push (8 MiB PATCHes), each to
    a fresh repository so every blob is uploaded;
  - lamina pull into an empty store (parallel layer downloads);
  - skopeo copy docker:// -> oci: of the same image, as a peer reference.
Prints a table of seconds and MB/s (best of --repeat).
"""

from __future__ import annotations

import argparse
import gzip
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lamina import api
from lamina.cache.store import LayerRecord, Store
from lamina.oci.digest import Digest
from lamina.oci.image import (
    OCI_CONFIG,
    OCI_LAYER_GZIP,
    Descriptor,
    ImageConfig,
    Manifest,
)
from tests import registry_server

NAME = "bench/registry:1"


def make_image(store: Store, size_mb: int, layers: int) -> int:
    """Store an image of `layers` random-content layers totalling ~size_mb; return blob bytes."""
    per_layer = size_mb * 1024 * 1024 // layers
    descriptors, diff_ids = [], []
    for index in range(layers):
        tar_bytes = io.BytesIO()
        with tarfile.open(fileobj=tar_bytes, mode="w") as tar:
            info = tarfile.TarInfo(f"data/blob{index}.bin")
            info.size = per_layer
            tar.addfile(info, io.BytesIO(os.urandom(per_layer)))
        raw = tar_bytes.getvalue()
        compressed = gzip.compress(raw, compresslevel=1, mtime=0)
        blob = store.put_bytes(compressed)
        diff_id = Digest.of_bytes(raw)
        store.record_layer(LayerRecord(blob.digest, diff_id, OCI_LAYER_GZIP, blob.size))
        descriptors.append(Descriptor(OCI_LAYER_GZIP, blob.digest, blob.size))
        diff_ids.append(diff_id)
    config = ImageConfig(diff_ids=tuple(diff_ids)).to_bytes()
    config_blob = store.put_bytes(config)
    manifest = Manifest(Descriptor(OCI_CONFIG, config_blob.digest, config_blob.size), tuple(descriptors))
    data = manifest.to_bytes()
    stored = store.put_bytes(data)
    total = config_blob.size + sum(d.size for d in descriptors)
    store.tag(f"docker.io/{NAME}", stored.digest, size=total)
    return total


def best(repeat: int, run: Callable[[int], None]) -> float:
    times = []
    for attempt in range(repeat):
        start = time.perf_counter()
        run(attempt)
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-mb", type=int, default=100)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    if registry_server.REGISTRY is None:
        sys.exit("docker-registry is not installed (apt-get install docker-registry)")
    work = Path(tempfile.mkdtemp(prefix="lamina-bench-registry-"))
    try:
        source_cache = work / "source-cache"
        with Store(source_cache) as store:
            total = make_image(store, args.size_mb, args.layers)
        mb = total / 1e6
        rows: list[tuple[str, float]] = []
        with registry_server.running_registry(work / "registry") as registry:
            host = registry.host

            def push(attempt: int, chunk: int | None = None, label: str = "mono") -> None:
                api.push(NAME, f"{host}/{label}{attempt}:1", chunk_size=chunk, cache_dir=source_cache)

            rows.append(("lamina push (monolithic)", best(args.repeat, push)))
            rows.append(
                (
                    "lamina push (8 MiB chunks)",
                    best(args.repeat, lambda a: push(a, 8 * 1024 * 1024, "chunked")),
                )
            )

            def pull(attempt: int) -> None:
                cache = work / f"pull-cache-{attempt}"
                api.pull(f"{host}/mono0:1", cache_dir=cache)
                shutil.rmtree(cache)

            rows.append(("lamina pull (empty store)", best(args.repeat, pull)))
            if registry_server.SKOPEO is not None:

                def skopeo_pull(attempt: int) -> None:
                    dest = work / f"skopeo-{attempt}"
                    subprocess.run(
                        ["skopeo", "copy", "--quiet", "--src-tls-verify=false",
                         f"docker://{host}/mono0:1", f"oci:{dest}:1"],
                        check=True,
                    )  # fmt: skip
                    shutil.rmtree(dest)

                rows.append(("skopeo copy docker:// -> oci: (peer)", best(args.repeat, skopeo_pull)))
        print(f"image: {args.layers} layers, {mb:.1f} MB of blobs; best of {args.repeat}; registry on {host}")
        print(f"{'operation':<40} {'seconds':>8} {'MB/s':>8}")
        for label, seconds in rows:
            print(f"{label:<40} {seconds:>8.2f} {mb / seconds:>8.1f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
