"""Pull and push throughput against Debian's docker-registry on 127.0.0.1.

    .venv/bin/python benchmarks/bench_registry.py [--size-mb 100] [--layers 4] [--repeat 3] [--no-build-cache]

Makes an image of incompressible layers (gzip level 1 over random bytes, so
blob size ~= --size-mb) straight in a throwaway store, then times:
  - lamina push (monolithic PUT) and chunked push (8 MiB PATCHes), each to
    a fresh repository so every blob is uploaded;
  - lamina pull into an empty store (parallel layer downloads);
  - skopeo copy docker:// -> oci: of the same image, as a peer reference.
Prints a table of seconds and MB/s (best of --repeat).

Then the registry build cache, on ../shared/bench's multistage workload
(its context and busybox base made by gen_context.py and mkbase.py), each
round from empty caches holding only the base image, `lamina build` as a
command (Python start-up included):
  - a cold build, no registry (the reference);
  - a cold build with --cache-to type=registry,mode=max (build + export);
  - a build on a second, empty cache with --cache-from (no step runs:
    every layer is fetched, verified and unpacked).
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
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
SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "bench"


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
    parser.add_argument(
        "--no-build-cache", action="store_true", help="Skip the --cache-to/--cache-from rows."
    )
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
            cache_rows = [] if args.no_build_cache else build_cache_rows(work, host, args.repeat)
        print(f"image: {args.layers} layers, {mb:.1f} MB of blobs; best of {args.repeat}; registry on {host}")
        print(f"{'operation':<40} {'seconds':>8} {'MB/s':>8}")
        for label, seconds in rows:
            print(f"{label:<40} {seconds:>8.2f} {mb / seconds:>8.1f}")
        if cache_rows:
            print(f"\nmultistage workload, empty caches each round; best of {args.repeat}")
            print(f"{'build':<48} {'seconds':>8} {'steps run':>10}")
            for label, seconds, ran in cache_rows:
                print(f"{label:<48} {seconds:>8.2f} {ran:>10}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def build_cache_rows(work: Path, host: str, repeat: int) -> list[tuple[str, float, int]]:
    """(label, best seconds, steps run) for a cold build, one exporting, one importing."""
    ctx, base = work / "ctx", work / "base"
    subprocess.run(
        [sys.executable, str(SHARED / "gen_context.py"), str(ctx)], check=True, capture_output=True
    )
    subprocess.run([sys.executable, str(SHARED / "mkbase.py"), str(base)], check=True, capture_output=True)
    dockerfile = SHARED / "dockerfiles" / "multistage.Dockerfile"
    ref = f"{host}/bench/cache"

    def build(name: str, *flags: str) -> tuple[float, int]:
        cache = work / f"cache-{name}"
        shutil.rmtree(cache, ignore_errors=True)
        env = {**os.environ, "LAMINA_CACHE": str(cache)}
        env.pop("SOURCE_DATE_EPOCH", None)
        lamina = [sys.executable, "-m", "lamina"]
        subprocess.run(
            [*lamina, "load", str(base / "busybox-oci.tar")], env=env, check=True, capture_output=True
        )
        meta = work / f"meta-{name}.json"
        command = [
            *lamina,
            "build",
            "--progress",
            "quiet",
            "-f",
            str(dockerfile),
            "--metadata-file",
            str(meta),
        ]
        start = time.perf_counter()
        subprocess.run([*command, *flags, str(ctx)], env=env, check=True, capture_output=True)
        seconds = time.perf_counter() - start
        steps = json.loads(meta.read_text())["lamina.build.steps"]
        return seconds, sum(1 for step in steps if step["cache"] == "run")

    results: dict[str, list[tuple[float, int]]] = {"cold": [], "to": [], "from": []}
    for attempt in range(repeat):
        tag = f"round{attempt}"
        results["cold"].append(build("cold"))
        results["to"].append(build("to", "--cache-to", f"type=registry,ref={ref}:{tag},mode=max"))
        results["from"].append(build("from", "--cache-from", f"type=registry,ref={ref}:{tag}"))
    labels = {
        "cold": "cold build (no registry)",
        "to": "cold build + --cache-to mode=max",
        "from": "empty cache, --cache-from (fetch + unpack)",
    }
    return [(labels[kind], *min(runs)) for kind, runs in results.items()]


if __name__ == "__main__":
    main()
