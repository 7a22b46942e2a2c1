"""The executor is what a step is given: it must keep every member of `model.StepHost`."""

from __future__ import annotations

from pathlib import Path

from lamina.cache.store import Store
from lamina.engine.dockerfile.parser import parse
from lamina.engine.executor import Executor
from lamina.engine.model import BuildOptions, StepHost
from lamina.engine.plan import make_plan
from lamina.engine.progress import QuietProgress


def test_executor_is_a_step_host(store: Store, tmp_path: Path) -> None:
    plan = make_plan(parse(b"FROM scratch\n", "Dockerfile"))
    executor = Executor(BuildOptions(context=tmp_path, cache_root=store.root), QuietProgress(), store, plan)
    assert isinstance(executor, StepHost)
    executor.cleanup()


def test_a_step_host_lacking_a_member_is_not_one(store: Store, tmp_path: Path) -> None:
    class Partial:
        options = BuildOptions(context=tmp_path)

    assert not isinstance(Partial(), StepHost)
