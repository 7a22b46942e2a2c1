"""Store and image-format throughput: put_blob, load, save (as stored, recompressed, docker).

    .venv/bin/python benchmarks/bench_store.py [--mb 100] [--files 10000]

Builds a tree of --files files totalling --mb MB (half random, half
repetitive bytes), writes it as a gzip layer with lamina's writer, commits
an image, then times each operation and prints MB/s of uncompressed tar
and the process's peak RSS.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path


def _make_tree(root: Path, files: int, total: int) -> None:
    size = max(1, total // files)
    for i in range(files):
        directory = root / f"d{i % 100:02d}"
        directory.mkdir(exist_ok=True)
        data = os.urandom(size) if i % 2 else bytes([i % 251]) * size
        (directory / f"f{i:05d}").write_bytes(data)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=100)
    parser.add_argument("--files", type=int, default=10_000)
    args = parser.parse_args()

    from lamina.cache.images import commit_image, load_image_file, save_image
    from lamina.cache.store import LayerRecord, Store
    from lamina.oci.compression import Compression
    from lamina.oci.image import default_config
    from lamina.oci.layer import write_layer
    from lamina.oci.walk import entries_from_tree

    work = Path(tempfile.mkdtemp(prefix="lamina-bench-store-"))
    rows: list[tuple[str, float, float]] = []
    try:
        tree = work / "tree"
        tree.mkdir()
        _make_tree(tree, args.files, args.mb * 1_000_000)
        with Store(work / "a") as store:
            start = time.perf_counter()
            with store.blob_writer() as out:
                info = write_layer(entries_from_tree(tree), out, Compression.GZIP)  # type: ignore[arg-type]
                blob = out.commit(info.digest)
            rows.append(("write_layer gzip into store", time.perf_counter() - start, 0))
            layer = LayerRecord(blob.digest, info.diff_id, info.media_type, blob.size)
            store.record_layer(layer)
            commit_image(store, default_config(), [layer], ["bench:1"])
            tar_mb = sum(p.stat().st_size for p in tree.rglob("*") if p.is_file()) / 1e6

            start = time.perf_counter()
            with open(store.blob_path(blob.digest), "rb") as f:
                store.put_blob(f)  # no expected digest: copied and hashed even though present
            rows.append(("put_blob (copy+hash+fsync)", time.perf_counter() - start, blob.size / 1e6))

            for label, fmt, compression in (
                ("save oci (as stored)", "oci", None),
                ("save oci --compression zstd", "oci", Compression.ZSTD),
                ("save oci zstd again (reused)", "oci", Compression.ZSTD),
                ("save --format docker", "docker", None),
            ):
                start = time.perf_counter()
                save_image(store, "bench:1", work / f"{fmt}.tar", format=fmt, compression=compression)
                rows.append((label, time.perf_counter() - start, tar_mb))
        with Store(work / "b") as other:
            start = time.perf_counter()
            load_image_file(other, work / "oci.tar")
            rows.append(("load oci (verify digest+diff_id)", time.perf_counter() - start, tar_mb))
            start = time.perf_counter()
            load_image_file(other, work / "docker.tar", "bench:docker")
            rows.append(("load docker-archive", time.perf_counter() - start, tar_mb))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"{args.files} files, {args.mb} MB tree; {os.cpu_count()} CPUs")
    print(f"{'operation':<36}{'seconds':>9}{'MB/s':>9}")
    for label, seconds, mb in rows:
        rate = f"{(mb or tar_mb) / seconds:9.0f}" if seconds else "        -"
        print(f"{label:<36}{seconds:9.2f}{rate}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS {peak:.0f} MB")


if __name__ == "__main__":
    main()
