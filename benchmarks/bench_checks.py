"""Build checks' cost: what `engine/buildchecks.for_build` adds to every build, a no-op rebuild too.

    .venv/bin/python benchmarks/bench_checks.py [--instructions 1000] [--stages 20] [--repeat 20]

Times parse + checks for a small Dockerfile (10 instructions) and for the
large generated one of bench_frontend.py, once for the stages a build of the
last target needs and once for every stage (`--call check`), next to parse +
plan for scale. Base images are taken as known (PATH only), so every rule runs.
Target: under 5 ms for the small Dockerfile, where a no-op rebuild is judged
against BuildKit's ~0.1 s.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_frontend import generate, size_arguments, timed

from lamina.engine.buildchecks import platform_args
from lamina.engine.dockerfile.checks import BaseFacts, CheckConfig, run_checks
from lamina.engine.dockerfile.parser import parse
from lamina.engine.plan import make_plan
from lamina.oci.image import Platform

TARGET_MS = 5.0
SMALL = """\
# syntax=docker/dockerfile:1
ARG GO_VERSION=1.22
FROM golang:${GO_VERSION} AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN --mount=type=cache,target=/root/.cache go mod download
COPY . .
RUN go build -o /out/app ./cmd/app
FROM gcr.io/distroless/static AS release
COPY --from=build /out/app /app
ENTRYPOINT ["/app"]
"""
FACTS = BaseFacts(("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",), ())


def main() -> int:
    args = size_arguments(__doc__)
    predefined = platform_args()
    amd64 = Platform(architecture="amd64", os="linux")

    def checks(text: str, every: bool) -> object:
        return run_checks(
            parse(text),
            config=CheckConfig(),
            predefined=predefined,
            all_stages=every,
            base_facts=lambda r: FACTS,
        )

    print(f"{'Dockerfile':<22} {'step':<26} {'best ms':>9} {'median ms':>10}")
    small_best = 0.0
    for label, text in (
        ("small (10 instr)", SMALL),
        ("large (generated)", generate(args.instructions, args.stages)),
    ):
        count = len(parse(text).children)
        rows = [
            ("parse", lambda t=text: parse(t)),
            ("parse + checks (build)", lambda t=text: checks(t, False)),
            ("parse + checks (all)", lambda t=text: checks(t, True)),
            ("parse + plan", lambda t=text: make_plan(parse(t), build_platform=amd64)),
        ]
        for name, fn in rows:
            best, median = timed(fn, args.repeat)
            if label.startswith("small") and name == "parse + checks (build)":
                small_best = best
            print(f"{label + f' {count}':<22} {name:<26} {best:>9.2f} {median:>10.2f}")
    verdict = "OK" if small_best < TARGET_MS else "SLOWER THAN TARGET"
    print(
        f"\ntarget: parse + checks, small Dockerfile < {TARGET_MS:.0f} ms -> {small_best:.2f} ms ({verdict})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
