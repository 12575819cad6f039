"""Our processes and foreign ones when NVML numbers pids in another namespace (a fake /proc)."""

from __future__ import annotations

import os

import pytest

from engine.async_engine import AsyncEngine
from engine.config import EngineConfig
from engine.device_monitor import DeviceMonitor
from engine.pid_namespace import INITIAL_PID_NAMESPACE, PidNamespace
from engine.telemetry import DeviceStats, FakeSource, GiB, Telemetry
from entrypoints.cli import build_parser
from entrypoints.cli import engine_options_from_args as options_of


def fake_proc(root, namespace: str, processes: dict[int, str | None]) -> str:
    """``processes``: pid -> its NSpid line's values (None: a status without one)."""
    os.makedirs(root / "self" / "ns")
    os.symlink(namespace, root / "self" / "ns" / "pid")
    for pid, nspid in processes.items():
        os.makedirs(root / str(pid))
        lines = [f"Name:\tpython\nPid:\t{pid}\n"] + ([f"NSpid:\t{nspid}\n"] if nspid is not None else [])
        (root / str(pid) / "status").write_text("".join(lines))
    return str(root)


CHILD = "pid:[4026532291]"


def test_our_workers_count_under_every_pid_their_nspid_gives(tmp_path):
    # A worker that is pid 12 here and 40012 one namespace up, where NVML numbers it.
    pids = PidNamespace(fake_proc(tmp_path, CHILD, {12: "40012\t12", 13: "13"}))
    assert pids.ours([12, 13]) == {12, 40012, 13}
    assert pids.foreign([40012, 13], pids.ours([12, 13])) == []


def test_in_a_container_an_unmappable_pid_is_unknown_not_foreign(tmp_path):
    # 77 is another program in this container; 50000 a host pid (maybe one of ours).
    pids = PidNamespace(fake_proc(tmp_path, CHILD, {12: "12", 77: "77"}))
    assert not pids.initial
    assert pids.foreign([50000, 77, 12], pids.ours([12])) == [77]


def test_in_the_initial_namespace_every_other_pid_is_foreign(tmp_path):
    pids = PidNamespace(fake_proc(tmp_path, INITIAL_PID_NAMESPACE, {12: "12"}))
    assert pids.initial and pids.foreign([50000, 12], pids.ours([12])) == [50000]


def test_an_unreadable_proc_compares_pids_as_they_are(tmp_path):
    pids = PidNamespace(str(tmp_path / "missing"))
    assert pids.initial and pids.ours([5]) == {5} and pids.foreign([5, 6], {5}) == [6]


def device(processes: dict[int, int]) -> DeviceStats:
    return DeviceStats(0, memory_used=10 * GiB, memory_total=80 * GiB, gpu_util=90.0, memory_util=10.0,
                       processes=processes)


def test_telemetry_maps_through_the_namespace(tmp_path):
    pids = PidNamespace(fake_proc(tmp_path, CHILD, {12: "40012\t12", 77: "77"}))
    source = FakeSource([device({40012: GiB, 50000: GiB, 77: GiB})])
    snapshot = Telemetry(source, our_pids=lambda: [12], pids=pids).sample(0.0)
    assert snapshot.foreign == {0: [77]}  # ours by NSpid, the unknown host pid not foreign


async def test_foreign_detection_can_be_turned_off():
    source = FakeSource([device({11: GiB, 77: 20 * GiB})])
    monitor = DeviceMonitor(0.01, source=source, detect_foreign=False)
    await monitor.start(device="cuda", model_device="cuda:0", num_ranks=1, our_pids=lambda: [11],
                        on_sample=lambda: None)
    try:
        state = monitor.state()
        assert state.known and state.interfered == frozenset() and state.rank_speed == {}
        assert state.free_memory == {0: 70 * GiB}  # memory still counts
    finally:
        monitor.stop()


@pytest.mark.parametrize(("flag", "value"), [([], None), (["--no-detect-foreign-processes"], False),
                                              (["--detect-foreign-processes"], True)])
def test_the_flag_reaches_the_engine_config(flag, value):
    args = build_parser().parse_args(["generate", "a fox", *flag])
    options = options_of(args)
    assert options.get("detect_foreign_processes") == value
    config = EngineConfig.create(**options)
    assert config.telemetry.detect_foreign_processes is (True if value is None else value)
    assert AsyncEngine(config).devices.detect_foreign is config.telemetry.detect_foreign_processes
