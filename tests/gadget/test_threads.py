"""CPU threads (gadget/threads.py): cgroup quotas v1/v2, affinity, the auto rule, scan slots across processes,
the CLI and XML settings; and the inline batching of ReconData that arrive together (external._batches)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from scoremri.gadget import threads
from scoremri.gadget.gadgetron.external import Prefetch, _batches, runtime_from_properties
from scoremri.recon.config import ConfigError


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v2_quota_strictest_along_the_path(tmp_path):
    _write(tmp_path / "cpu.max", "max 100000\n")
    _write(tmp_path / "kubepods" / "cpu.max", "400000 100000\n")
    _write(tmp_path / "kubepods" / "pod1" / "cpu.max", "250000 100000\n")
    assert threads.cgroup_cpu_limit(tmp_path, "0::/kubepods/pod1\n") == 2.5
    # a container sees its own cgroup at the mount root (docker --cpus 1.5)
    root = tmp_path / "container"
    _write(root / "cpu.max", "150000 100000\n")
    assert threads.cgroup_cpu_limit(root, "0::/\n") == 1.5
    _write(root / "cpu.max", "max 100000\n")
    assert threads.cgroup_cpu_limit(root, "0::/\n") is None


def test_cgroup_v1_quota(tmp_path):
    _write(tmp_path / "cpu,cpuacct" / "docker" / "abc" / "cpu.cfs_quota_us", "300000\n")
    _write(tmp_path / "cpu,cpuacct" / "docker" / "abc" / "cpu.cfs_period_us", "100000\n")
    text = "12:cpu,cpuacct:/docker/abc\n4:memory:/docker/abc\n"
    assert threads.cgroup_cpu_limit(tmp_path, text) == 3.0
    _write(tmp_path / "cpu,cpuacct" / "docker" / "abc" / "cpu.cfs_quota_us", "-1\n")
    assert threads.cgroup_cpu_limit(tmp_path, text) is None
    # inside the container: the controller mounted at its root
    _write(tmp_path / "c" / "cpu" / "cpu.cfs_quota_us", "50000\n")
    _write(tmp_path / "c" / "cpu" / "cpu.cfs_period_us", "100000\n")
    assert threads.cgroup_cpu_limit(tmp_path / "c", "3:cpu:/docker/abc\n") == 0.5


def test_usable_cpus_is_the_smaller_of_affinity_and_quota(tmp_path):
    aff = threads.affinity_cpus()
    assert aff == len(os.sched_getaffinity(0))
    _write(tmp_path / "cpu.max", "150000 100000\n")
    n, why = threads.usable_cpus(tmp_path, "0::/\n")
    assert n == 1 and "quota 1.5" in why  # floor: never more threads than the quota pays for
    _write(tmp_path / "cpu.max", f"{(aff + 8) * 100000} 100000\n")
    assert threads.usable_cpus(tmp_path, "0::/\n")[0] == aff


def test_auto_rule_shares_usable_cpus_and_respects_idle_ones(monkeypatch):
    monkeypatch.setattr(threads, "_USER_OMP", None)
    monkeypatch.setattr(threads, "usable_cpus", lambda: (8, "affinity 8"))
    monkeypatch.setattr(threads, "idle_cpus", lambda: None)
    assert threads.plan(scans=1).threads == 8
    assert threads.plan(scans=2).threads == 4
    assert threads.plan(scans=3).threads == 2
    assert threads.plan(scans=20).threads == 1
    monkeypatch.setattr(threads, "idle_cpus", lambda: 1.3)  # a busy host: 1 thread, not a pile-up
    p = threads.plan(scans=1)
    assert p.threads == 1 and p.source == "auto" and "1.3 CPUs idle" in p.describe()
    monkeypatch.setattr(threads, "idle_cpus", lambda: 0.0)
    assert threads.plan(scans=1).threads == 1
    # explicit numbers are used as given; OMP_NUM_THREADS set by the user counts as explicit
    assert threads.plan(3).threads == 3 and threads.plan("auto", scans=1).threads == 1
    monkeypatch.setattr(threads, "_USER_OMP", "2")
    assert threads.plan(None).threads == 2 and threads.plan(None).source == "OMP_NUM_THREADS"
    assert threads.plan(5).threads == 5


def test_parse_threads():
    assert threads.parse_threads("auto") is None and threads.parse_threads("0") is None
    assert threads.parse_threads(" 3 ") == 3 and threads.parse_threads(None) is None
    for bad in ("x", "-2", "1.5"):
        with pytest.raises(threads.ThreadsError, match="threads"):
            threads.parse_threads(bad)


def test_scan_slots_are_counted_across_processes_and_die_with_them(tmp_path):
    d = tmp_path / "run"
    assert threads.active_scans(d) == 0
    with threads.ScanSlot(d), threads.ScanSlot(d):
        assert threads.active_scans(d) == 2
    assert threads.active_scans(d) == 0
    code = ("import sys, time; from scoremri.gadget.threads import ScanSlot\n"
            f"s = ScanSlot(__import__('pathlib').Path({str(d)!r})).__enter__(); print('held', flush=True); "
            "time.sleep(60)")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "held"
        with threads.ScanSlot(d):
            assert threads.active_scans(d) == 2
    finally:
        child.kill()
        child.wait(10)
    assert threads.active_scans(d) == 0  # the killed process's slot is no longer held: removed
    assert list(d.glob("scan-*.lock")) == []


def test_configure_sets_torch_and_the_environment(monkeypatch, caplog):
    monkeypatch.setattr(threads, "_state", dict(threads._state))  # the process's own choice is restored after
    # (torch's thread count: by the autouse fixture of tests/conftest.py)
    for var in threads.ENV_VARS:
        monkeypatch.setenv(var, os.environ.get(var, "1"))
    with caplog.at_level("INFO", logger="scoremri.gadget.threads"):
        p = threads.configure(3)
    assert p.threads == 3 and torch.get_num_threads() == 3
    assert all(os.environ[v] == "3" for v in threads.ENV_VARS)
    msgs = [r.getMessage() for r in caplog.records]
    assert msgs[-1] == f"threads: {p.describe()}"
    if threads.affinity_cpus() < 3:  # more threads than CPUs: said so
        assert msgs[0].startswith("threads = 3 is more than the") and "oversubscription" in msgs[0]
    n = len(msgs)
    assert threads.rebalance() == p  # explicit: left alone, nothing logged
    assert len(caplog.records) == n


def test_runtime_properties():
    assert runtime_from_properties({"threads": "2", "slice_batch": "8"}) == (2, 8)
    assert runtime_from_properties({"threads": "auto"}) == (None, None)
    with pytest.raises(ConfigError, match="threads = 'many'"):
        runtime_from_properties({"threads": "many"})
    with pytest.raises(ConfigError, match="slice_batch = '-1'"):
        runtime_from_properties({"slice_batch": "-1"})


class _FakeConnection:
    """Items from a list, as gadgetron's Connection._read_item gives them; CLOSE at the end."""

    def __init__(self, items, delay: float = 0.0) -> None:
        self.items = list(items)
        self.sent: list = []
        self.delay = delay

    def _read_item(self):
        if not self.items:
            raise StopIteration
        time.sleep(self.delay)
        return 1023, self.items.pop(0)

    def send(self, item) -> None:
        self.sent.append(item)


def test_inline_batches_take_what_is_waiting_and_pass_other_messages_through():
    conn = _FakeConnection(["r1", "r2", "r3", "acq", "r4", "r5", "r6"])
    pre = Prefetch(conn, depth=16)
    time.sleep(0.2)  # everything has arrived: batches as large as allowed, split at the pass-through
    got = list(_batches(pre, conn, lambda x: x.startswith("r"), max_items=2))
    assert got == [["r1", "r2"], ["r3"], ["r4", "r5"], ["r6"]] and conn.sent == ["acq"]
    # slices arriving one by one, slower than they are taken: one at a time, at once
    conn = _FakeConnection(["r1", "r2", "r3"], delay=0.15)
    pre = Prefetch(conn, depth=16)
    assert list(_batches(pre, conn, lambda x: x.startswith("r"), max_items=8)) == [["r1"], ["r2"], ["r3"]]


def test_reader_errors_reach_the_scan_thread():
    class Broken(_FakeConnection):
        def _read_item(self):
            raise ValueError("malformed ReconData")

    conn = Broken([])
    with pytest.raises(ValueError, match="malformed"):
        list(_batches(Prefetch(conn, depth=2), conn, lambda x: True, max_items=4))


def test_cli_threads_flag(tmp_path, capsys):
    from scoremri.gadget.cli import main

    for flag, value in (("--threads", "lots"), ("--slice-batch", "-3")):
        with pytest.raises(SystemExit) as e:
            main(["replay", "x.h5", "-o", str(tmp_path / "o.h5"), flag, value])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("scoremri replay: error: argument") and f"{flag}" in err and value in err


def test_mrd_scan_runtime_settings(repo):
    """An MRD client's configuration may carry the runtime settings too; the server's default XML may not
    override its own flags."""
    from scoremri.gadget.mrd.config import ConfigResolver

    r = ConfigResolver("fast")
    scan = r.resolve(text='<configuration><property name="threads" value="2"/>'
                          '<property name="slice_batch" value="3"/></configuration>')
    assert (scan.threads, scan.slice_batch) == (2, 3)
    scan = r.resolve(text=(repo / "pipelines" / "scoremri.xml").read_text())  # threads auto, slice_batch 0
    assert (scan.threads, scan.slice_batch) == (None, 0)
    assert (r.resolve(name="fast").threads, r.resolve(name="fast").slice_batch) == (None, None)
    with pytest.raises(ConfigError, match="threads = 'x'"):
        r.resolve(text='<configuration><property name="threads" value="x"/></configuration>')
