"""A plan's VMs scheduled and migrated in-process: ``planschedule.Scheduler`` deciding, real pipelines
running (one thread each) onto the fake target (tests/fakes.py), each VM's need measured through its
disk sinks as ``plan run`` measures it. What this adds to test_plan_scheduler.py (the decisions alone):
the decisions hold with real migrations under them, the space a VM waits for is what its sinks say, and
one VM's failure (cleaned up as the pipeline does) stops none of the others.

``plan run`` itself, with its child processes, is test_plan_run.py's (slow tier).
"""

from __future__ import annotations

import threading
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import pytest

from fakes import FakeSource, FakeTarget, raw_disk
from v2p.errors import TargetError
from v2p.options import MigrationOptions
from v2p.pipeline import Pipeline
from v2p.planschedule import Need, Scheduler
from v2p.sizing import SpaceNeed

KEY = "fake:local"


class InProcessPlan:
    """The VMs ``sources`` (VMIDs 100, 101, ...) migrated onto ``target`` as ``plan run`` schedules them;
    a VM runs until the test lets it finish (``finish``), or to its end when ``gated`` is False."""

    def __init__(self, target: FakeTarget, sources: list[FakeSource], *, parallel: int, per_storage: int,
                 gated: bool = True) -> None:
        self.target, self.sources = target, sources
        self.schedule = Scheduler(len(sources), parallel=parallel, per_storage=per_storage, per_node=8)
        self.gates = [threading.Event() for _ in sources]
        if not gated:
            for gate in self.gates:
                gate.set()
        self.pool = ThreadPoolExecutor(max_workers=len(sources))
        self.futures: dict[Future[dict[str, Any]], int] = {}
        self.started: list[int] = []
        self.most_at_once = 0
        self.waited: dict[int, list[str]] = {}  # what each VM waited for, in turn
        self.results: dict[int, dict[str, Any] | BaseException] = {}

    def vmid(self, index: int) -> int:
        return 100 + index

    def measure(self, index: int) -> Need:
        """Every disk's sink ``check``, summed per storage (``plan run``'s ``_measure``)."""
        space, source = SpaceNeed(), self.sources[index]
        for disk_index, disk in enumerate(source.spec().disks):
            endpoint = source.disk_endpoint(disk, Path("/nonexistent"))
            sink = self.target.disk_sink(self.vmid(index), disk_index, fmt=None, storage="local")
            space.add(sink.check(endpoint, capacity=source.disk_facts(disk, Path("/nonexistent")).capacity))
        return Need(KEY, space.required, space.free)

    def look(self) -> None:
        for index in self.schedule.due(0.0):
            need = self.schedule.measured.get(index) or self.measure(index)
            waiting = self.schedule.waits_for(index, need)
            if waiting is not None:
                self.waited.setdefault(index, []).append(waiting)
                continue
            self.schedule.start(index, need)
            self.started.append(index)
            self.futures[self.pool.submit(self._migrate, index)] = index
        self.most_at_once = max(self.most_at_once, len(self.schedule.running))

    def _migrate(self, index: int) -> dict[str, Any]:
        assert self.gates[index].wait(10), f"VM {index} was never let finish"
        return Pipeline(self.sources[index], self.vmid(index), MigrationOptions(), self.target).run()

    def finish(self, *indexes: int) -> list[int]:
        """Let VMs ``indexes`` run to their end, end them in the schedule, look again; the VMs started then."""
        for index in indexes:
            self.gates[index].set()
        ended = {future: index for future, index in self.futures.items() if index in indexes}
        wait(ended)
        for future, index in ended.items():
            del self.futures[future]
            self.results[index] = future.exception() or future.result()
            self.schedule.end(index)
        before = len(self.started)
        self.look()
        return self.started[before:]

    def run_all(self) -> None:
        """Every VM to its end (ungated), as they finish."""
        self.look()
        while self.futures:
            done, _ = wait(self.futures, return_when=FIRST_COMPLETED)
            self.finish(*(self.futures[future] for future in done))

    def close(self) -> None:
        for gate in self.gates:
            gate.set()
        self.pool.shutdown()


@pytest.fixture
def fake(tmp_path: Path) -> FakeTarget:
    return FakeTarget(tmp_path / "target")


def vms(tmp_path: Path, count: int) -> list[FakeSource]:
    return [FakeSource([raw_disk(tmp_path / f"vm{i}.raw", fill=b"vm%d" % i)], name=f"vm{i}") for i in range(count)]


def finished(plan: InProcessPlan, index: int) -> bool:
    result = plan.results.get(index)
    return isinstance(result, dict) and bool(result.get("finished"))


def test_parallel_caps_the_migrations_running_and_they_start_in_plan_order(fake: FakeTarget,
                                                                           tmp_path: Path) -> None:
    plan = InProcessPlan(fake, vms(tmp_path, 5), parallel=2, per_storage=4)
    try:
        plan.look()
        assert plan.started == [0, 1] and plan.most_at_once == 2
        assert plan.finish(1) == [2]  # a slot freed: the next VM in plan order
        assert plan.finish(0, 2) == [3, 4]
        plan.finish(3, 4)
    finally:
        plan.close()
    assert plan.most_at_once == 2 and all(finished(plan, i) for i in range(5))
    assert fake.list_vms() == [100, 101, 102, 103, 104] and fake.count("create_vm") == 5


def test_per_storage_caps_the_migrations_onto_one_storage(fake: FakeTarget, tmp_path: Path) -> None:
    plan = InProcessPlan(fake, vms(tmp_path, 3), parallel=3, per_storage=1)
    try:
        plan.look()
        slot = f"a free slot on {KEY} (at most 1 at once)"
        assert plan.started == [0] and plan.waited == {1: [slot], 2: [slot]}
        assert plan.finish(0) == [1]
        assert plan.finish(1) == [2]
        plan.finish(2)
    finally:
        plan.close()
    assert all(finished(plan, i) for i in range(3))


def test_a_vm_waits_for_the_room_the_running_ones_reserved(fake: FakeTarget, tmp_path: Path) -> None:
    sources = vms(tmp_path, 3)
    probe = InProcessPlan(fake, sources, parallel=3, per_storage=3)
    one = probe.measure(0).required  # qemu-img measure of one VM's disk, through its sink
    probe.close()
    fake.free["local"] = 2 * one + one // 2  # room for two at once, not three
    plan = InProcessPlan(fake, sources, parallel=3, per_storage=3)
    try:
        plan.look()
        assert plan.started == [0, 1]
        assert plan.waited[2][0].startswith(f"0.00 GiB on {KEY}") and "reserved by the VMs running there" in \
            plan.waited[2][0]
        assert plan.finish(0) == [2]
        plan.finish(1, 2)
    finally:
        plan.close()
    assert all(finished(plan, i) for i in range(3))


def test_a_failing_vm_stops_none_of_the_others(fake: FakeTarget, tmp_path: Path) -> None:
    fake.fail["create_vm 101"] = TargetError("the target refused VM 101")
    fake.fail["write local:102/vm-102-disk-0.qcow2"] = TargetError("the storage broke")
    plan = InProcessPlan(fake, vms(tmp_path, 4), parallel=2, per_storage=2, gated=False)
    try:
        plan.run_all()
    finally:
        plan.close()
    assert plan.started == [0, 1, 2, 3]
    refused, broke = plan.results[1], plan.results[2]
    assert isinstance(refused, TargetError) and refused.message == "the target refused VM 101"  # nothing made
    assert isinstance(broke, TargetError) and broke.message == "the storage broke; removed VM 102 and its disks"
    assert finished(plan, 0) and finished(plan, 3)
    assert fake.list_vms() == [100, 103]
    assert fake.volumes() == ["100/vm-100-disk-0.qcow2", "103/vm-103-disk-0.qcow2"]
