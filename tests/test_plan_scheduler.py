"""``plan run``'s scheduling decisions, in-process and in milliseconds: which VM starts next under
--parallel, per_storage, per_node and the space the running VMs reserved (``planschedule.Scheduler``).
The processes those decisions start are ``test_plan_run.py``'s."""

from __future__ import annotations

from v2p.planschedule import Need, Scheduler

GiB = 1 << 30


def started(schedule: Scheduler, needs: dict[int, Need], now: float = 0.0) -> list[int]:
    """One look at the waiting VMs, as ``plan run`` takes it: each that may start, starts."""
    out = []
    for index in schedule.due(now):
        if schedule.waits_for(index, needs[index]) is None:
            schedule.start(index, needs[index])
            out.append(index)
    return out


def test_parallel_caps_how_many_run_and_a_slot_freed_starts_the_next_in_plan_order() -> None:
    needs = {i: Need(f"local:s{i}", 0, None) for i in range(5)}
    schedule = Scheduler(5, parallel=2, per_storage=3, per_node=4)
    assert started(schedule, needs) == [0, 1]
    assert started(schedule, needs) == []  # nothing ended: nothing looked at
    schedule.end(1)
    assert started(schedule, needs) == [2]
    schedule.end(0)
    schedule.end(2)
    assert started(schedule, needs) == [3, 4]
    assert schedule.pending == []


def test_nothing_is_looked_at_while_every_slot_is_taken() -> None:
    schedule = Scheduler(3, parallel=1, per_storage=1, per_node=1)
    assert started(schedule, {i: Need("k", 0, None) for i in range(3)}) == [0]
    schedule.changed = True
    assert list(schedule.due(0.0)) == []


def test_per_storage_limit_lets_a_vm_on_another_storage_pass() -> None:
    needs = {0: Need("pve/n1:fast", 0, None), 1: Need("pve/n1:fast", 0, None), 2: Need("pve/n1:slow", 0, None)}
    schedule = Scheduler(3, parallel=3, per_storage=1, per_node=4)
    assert started(schedule, needs) == [0, 2]
    assert schedule.waits_for(1, needs[1]) == "a free slot on pve/n1:fast (at most 1 at once)"
    assert schedule.pending == [1]
    schedule.end(0)
    assert started(schedule, needs) == [1]


def test_per_node_limit_counts_every_storage_of_the_node() -> None:
    needs = {0: Need("pve/n1:a", 0, None, "n1"), 1: Need("pve/n1:b", 0, None, "n1"),
             2: Need("pve/n2:a", 0, None, "n2"), 3: Need("local:x", 0, None)}
    schedule = Scheduler(4, parallel=4, per_storage=3, per_node=1)
    assert started(schedule, needs) == [0, 2, 3]  # no node: no node limit
    assert schedule.waits_for(1, needs[1]) == "a free slot on node n1 (at most 1 at once)"


def test_space_reserved_by_running_vms_holds_back_one_that_would_not_fit() -> None:
    needs = {0: Need("local:s", 6 * GiB, 10 * GiB), 1: Need("local:s", 6 * GiB, 10 * GiB),
             2: Need("local:other", 6 * GiB, 10 * GiB), 3: Need("local:s", 3 * GiB, 10 * GiB)}
    schedule = Scheduler(4, parallel=4, per_storage=4, per_node=4)
    assert started(schedule, needs) == [0, 2, 3]  # VM 3 fits beside VM 0; VM 1 does not
    assert schedule.reserved("local:s") == 9 * GiB
    assert schedule.waits_for(1, needs[1]) == \
        "6.00 GiB on local:s (10.00 GiB free, 9.00 GiB reserved by the VMs running there)"
    assert 1 not in schedule.measured  # measured again: the free space will have changed
    schedule.end(0)
    schedule.end(3)
    assert started(schedule, {**needs, 1: Need("local:s", 6 * GiB, 7 * GiB)}) == [1]


def test_a_vm_not_measured_is_never_held_back_for_space() -> None:
    schedule = Scheduler(2, parallel=2, per_storage=2, per_node=2)
    needs = {0: Need("local:s", 9 * GiB, 10 * GiB), 1: Need("local:s", 0, None)}
    assert started(schedule, needs) == [0, 1]


def test_a_retried_vm_goes_first_but_not_before_its_time() -> None:
    needs = {i: Need("k", 0, None) for i in range(3)}
    schedule = Scheduler(3, parallel=1, per_storage=3, per_node=3)
    assert started(schedule, needs, now=0.0) == [0]
    schedule.end(0)
    schedule.retry(0, at=5.0)  # its VMID was locked: again in 5 s
    assert schedule.pending == [0, 1, 2]
    assert started(schedule, needs, now=1.0) == [1]
    schedule.end(1)
    assert started(schedule, needs, now=1.0) == [2]  # 0 is not due yet
    schedule.end(2)
    assert started(schedule, needs, now=2.0) == []
    assert started(schedule, needs, now=5.0) == [0]  # due: looked at though nothing ended


def test_a_kept_measure_is_reused_until_room_was_lacking() -> None:
    schedule = Scheduler(2, parallel=2, per_storage=1, per_node=2)
    needs = {0: Need("k", 0, None), 1: Need("k", 1, 2)}
    assert started(schedule, needs) == [0]
    assert schedule.measured[1] == needs[1]  # waited for a slot: its measure holds


def test_stop_and_drop() -> None:
    schedule = Scheduler(4, parallel=1, per_storage=1, per_node=1)
    schedule.drop(2)  # refused by the plan's checks
    assert started(schedule, {i: Need("k", 0, None) for i in range(4)}) == [0]
    assert schedule.stop() == [1, 3]
    assert schedule.pending == [] and list(schedule.running) == [0]
    schedule.end(0)
    assert list(schedule.due(10.0)) == []


def test_one_space_sum_for_preflight_and_the_reservations() -> None:
    """``sizing.SpaceNeed``: the disks' bytes on their storage (what plan run reserves) and on every
    storage they keep room on (an upload in PVE's import storage), which preflight checks together."""
    from v2p.sizing import SpaceNeed

    space = SpaceNeed()
    space.add({"storage": "local-lvm", "required_bytes": 4 * GiB, "free_bytes": 10 * GiB,
               "also": [{"storage": "local", "required_bytes": 3 * GiB, "free_bytes": 5 * GiB}]})
    assert space.short() is None
    space.add({"storage": "local-lvm", "required_bytes": 5 * GiB, "free_bytes": 10 * GiB,
               "also": [{"storage": "local", "required_bytes": 3 * GiB, "free_bytes": 5 * GiB}]})
    assert (space.storage, space.required, space.free) == ("local-lvm", 9 * GiB, 10 * GiB)
    assert space.short() == ("local", 6 * GiB, 5 * GiB)  # each upload fits alone, not both
