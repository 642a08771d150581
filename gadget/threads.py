"""CPU threads: the one place that decides how many threads the reconstruction uses, so it never oversubscribes.

torch's default (one intra-op thread per physical core of the HOST) ignores the CPU affinity and the cgroup
quota a container runs under (``docker --cpus``, Kubernetes limits), other scans running beside it and other
load on the host. On a busy 2-core machine two OpenMP threads made one slice 20x slower than one thread
(every parallel region waits for the thread that is not scheduled). The rule here:

    threads = --threads / <property name="threads"> / OMP_NUM_THREADS when set (explicit, used as given);
    otherwise ("auto") min(usable CPUs / concurrent scans, CPUs idle over the last minute), at least 1,

- usable CPUs: ``os.sched_getaffinity`` (taskset, ``docker --cpuset-cpus``) and the cgroup CPU quota
  (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us / cpu.cfs_period_us``; ``docker --cpus 2.5`` -> 2), the smaller;
- concurrent scans: every scoremri process reconstructing a scan holds a :class:`ScanSlot` (a locked file in
  ``$SCOREMRI_RUN_DIR``, default ``/dev/shm`` or the temp dir), so two scans on 8 usable CPUs get 4 each;
- idle CPUs: the number of CPUs this host has minus its 1-minute load average (without this process's own
  share), so a host already busy with other work gets 1 thread rather than a pile-up.

``configure`` also keeps big temporaries in the heap (:func:`keep_heap`): glibc hands every block above its
mmap threshold back to the OS when it is freed, so each 4 MB coil tensor of data consistency came back as
fresh, zero-filled pages: 0.7 million page faults and 1.8 s of system time in a one-slice replay that took
10 s of CPU; with the threshold at 32 MiB and no trimming, 0.1 million and 0.5 s.

The plan sets torch's intra-op threads (``torch.set_num_threads``; the ONNX backend sizes its session from
it), the BLAS / OpenMP pools numpy uses (threadpoolctl when installed) and ``OMP_NUM_THREADS`` /
``MKL_NUM_THREADS`` / ``OPENBLAS_NUM_THREADS`` for child processes. It is logged once at start, and again
only when it changes (:func:`rebalance` at each scan and batch of slices).
"""
from __future__ import annotations

import errno
import fcntl
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
CGROUP_ROOT = Path("/sys/fs/cgroup")
_USER_OMP = os.environ.get("OMP_NUM_THREADS")  # as the user set it, before apply() exports our own choice


class ThreadsError(ValueError):
    """A thread count that cannot be used (the message names it)."""


@dataclass(frozen=True)
class ThreadPlan:
    """How many threads, and why. threads: intra-op threads; usable: CPUs this process may use; scans:
    concurrent scoremri scans sharing them; idle: CPUs idle on the host (None when unknown); source: where the
    number came from ('--threads', 'OMP_NUM_THREADS', 'auto')."""

    threads: int
    usable: int
    usable_from: str
    scans: int
    idle: float | None
    source: str

    def describe(self) -> str:
        why = f"{self.usable} usable CPUs ({self.usable_from})"
        if self.source == "auto":
            why += f", {self.scans} concurrent scan{'s' if self.scans != 1 else ''}"
            if self.idle is not None:
                why += f", {self.idle:.1f} CPUs idle (1-min load average)"
        return f"{self.threads} CPU thread{'s' if self.threads != 1 else ''} ({self.source}: {why})"


# ----------------------------------------------------------------------------------------- usable CPUs
def affinity_cpus() -> int:
    """CPUs this process may be scheduled on (``sched_getaffinity``; ``os.cpu_count`` where unsupported)."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except (AttributeError, OSError):
        return max(os.cpu_count() or 1, 1)


def _cgroup_paths(proc_cgroup: str) -> tuple[str | None, str | None, str | None]:
    """(/proc/self/cgroup text) -> (v2 path, v1 cpu controller mount name, v1 path)."""
    v2 = v1_name = v1_path = None
    for line in proc_cgroup.splitlines():
        parts = line.strip().split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "" and parts[0] == "0":
            v2 = path
        elif "cpu" in controllers.split(","):
            v1_name, v1_path = controllers, path
    return v2, v1_name, v1_path


def _candidates(base: Path, path: str | None) -> list[Path]:
    """The cgroup folder of ``path`` and every parent up to ``base`` (a container sees its own cgroup at the
    mount root, a host process at ``base/path``): the strictest limit on the way applies."""
    out = []
    if path:
        p = base / path.lstrip("/")
        while True:
            out.append(p)
            if p == base or base not in p.parents:
                break
            p = p.parent
    if base not in out:
        out.append(base)
    return out


def _read(p: Path) -> str | None:
    try:
        return p.read_text().strip()
    except OSError:
        return None


def cgroup_cpu_limit(root: Path = CGROUP_ROOT, proc_cgroup: str | None = None) -> float | None:
    """The cgroup CPU quota in CPUs (``docker --cpus 2.5`` -> 2.5), the strictest along the cgroup path, or
    None when unlimited / not found. cgroup v2 ``cpu.max`` ("max 100000" or "250000 100000") and v1
    ``cpu.cfs_quota_us`` (-1 = unlimited) / ``cpu.cfs_period_us``."""
    if proc_cgroup is None:
        proc_cgroup = _read(Path("/proc/self/cgroup")) or ""
    v2, v1_name, v1_path = _cgroup_paths(proc_cgroup)
    limits: list[float] = []
    if v2 is not None or (root / "cpu.max").exists():
        for d in _candidates(root, v2):
            text = _read(d / "cpu.max")
            if not text:
                continue
            quota, _, period = text.partition(" ")
            if quota != "max" and period:
                try:
                    limits.append(int(quota) / int(period))
                except (ValueError, ZeroDivisionError):
                    pass
    mounts = [root / v1_name] if v1_name else []
    mounts += [root / "cpu", root / "cpu,cpuacct", root / "cpuacct,cpu"]
    for base in mounts:
        if not base.is_dir():
            continue
        for d in _candidates(base, v1_path):
            q, p = _read(d / "cpu.cfs_quota_us"), _read(d / "cpu.cfs_period_us")
            try:
                quota, period = int(q or -1), int(p or 0)
            except ValueError:
                continue
            if quota > 0 and period > 0:
                limits.append(quota / period)
        break
    return min(limits) if limits else None


def usable_cpus(root: Path = CGROUP_ROOT, proc_cgroup: str | None = None) -> tuple[int, str]:
    """(CPUs this process may use, how that was found): min(affinity, floor(cgroup quota)), at least 1."""
    aff = affinity_cpus()
    quota = cgroup_cpu_limit(root, proc_cgroup)
    if quota is None or math.floor(quota) >= aff:
        extra = f"; cgroup quota {quota:g} CPUs" if quota is not None else ""
        return aff, f"affinity {aff}{extra}"
    return max(int(math.floor(quota)), 1), f"cgroup quota {quota:g} CPUs, affinity {aff}"


# ------------------------------------------------------------------------------------ idle CPUs, scans
_own_cpu = {"t": time.monotonic(), "cpu": time.process_time()}


def idle_cpus() -> float | None:
    """CPUs idle on this host: online CPUs minus the 1-minute load average, this process's own recent CPU
    use (since the previous call) added back. None when the load average cannot be read."""
    try:
        load1 = os.getloadavg()[0]
    except (AttributeError, OSError):
        return None
    now, cpu = time.monotonic(), time.process_time()
    dt = now - _own_cpu["t"]
    own = (cpu - _own_cpu["cpu"]) / dt if dt > 1.0 else 0.0
    _own_cpu.update(t=now, cpu=cpu)
    return max((os.cpu_count() or 1) - max(load1 - min(own, load1), 0.0), 0.0)


def run_dir() -> Path:
    """Where the scan slots live: ``$SCOREMRI_RUN_DIR``, else /dev/shm/scoremri-<uid>, else the temp dir."""
    env = os.environ.get("SCOREMRI_RUN_DIR")
    if env:
        return Path(env)
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() and os.access("/dev/shm", os.W_OK) else Path(tempfile.gettempdir())
    return base / f"scoremri-{os.getuid() if hasattr(os, 'getuid') else 'user'}"


def active_scans(directory: Path | None = None) -> int:
    """How many scan slots are held (by live processes: a slot's lock dies with its process)."""
    d = directory or run_dir()
    n = 0
    try:
        entries = list(d.glob("scan-*.lock"))
    except OSError:
        return 0
    for p in entries:
        try:
            fd = os.open(p, os.O_RDWR)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                n += 1  # held by a running scan
            continue
        else:  # nobody holds it: a slot left by a process that died; remove it
            try:
                p.unlink()
            except OSError:
                pass
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
    return n


class ScanSlot:
    """Held while a scan is reconstructed: other scoremri processes count it when they share the CPUs.

    ``with ScanSlot(): ...``; never raises for an unusable run directory (the scan then simply is not
    counted)."""

    def __init__(self, directory: Path | None = None) -> None:
        self.directory = directory or run_dir()
        self.fd: int | None = None
        self.path: Path | None = None

    def __enter__(self) -> "ScanSlot":
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix="scan-", suffix=".lock", dir=self.directory)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self.fd, self.path = fd, Path(name)
        except OSError as e:
            log.debug("scan slot not registered in %s: %s", self.directory, e)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.fd is not None:
            try:
                if self.path is not None:
                    self.path.unlink()
            except OSError:
                pass
            os.close(self.fd)
            self.fd = self.path = None


# ----------------------------------------------------------------------------------------------- plan
def parse_threads(value: Any, name: str = "threads") -> int | None:
    """'auto' / '' / None / 0 -> None (auto); a positive integer -> it; anything else -> ThreadsError."""
    if value is None:
        return None
    text = str(value).strip().lower()
    if text in ("", "auto", "0"):
        return None
    try:
        n = int(text)
    except ValueError:
        raise ThreadsError(f"{name} = '{value}' is not a positive integer or 'auto'") from None
    if n < 0:
        raise ThreadsError(f"{name} = {n} must be >= 1 (or 0 / auto)")
    return n


def plan(requested: int | str | None = None, *, scans: int | None = None) -> ThreadPlan:
    """The thread plan for ``requested`` (int, 'auto' or None): explicit numbers are used as given (a
    WARNING when above the usable CPUs); otherwise OMP_NUM_THREADS when set, else the auto rule."""
    usable, usable_from = usable_cpus()
    n = parse_threads(requested)
    if n is not None:
        if n > usable:
            log.warning("threads = %d is more than the %d CPUs this process may use (%s): expect oversubscription",
                        n, usable, usable_from)
        return ThreadPlan(n, usable, usable_from, 1, None, "--threads / threads property")
    env = (_USER_OMP or "").strip()
    if env:
        try:
            n = parse_threads(env, "OMP_NUM_THREADS")
        except ThreadsError as e:
            log.warning("%s: ignored", e)
            n = None
        if n is not None:
            return ThreadPlan(n, usable, usable_from, 1, None, "OMP_NUM_THREADS")
    k = max(active_scans() if scans is None else scans, 1)
    share = max(usable // k, 1)
    idle = idle_cpus()
    threads = share if idle is None else max(min(share, int(math.floor(idle + 0.5))), 1)
    return ThreadPlan(threads, usable, usable_from, k, idle, "auto")


_state: dict[str, Any] = {"applied": None, "requested": None, "default": None, "tpc": None}


def apply(p: ThreadPlan) -> None:
    """Set torch's intra-op threads, numpy's BLAS/OpenMP pools and the OMP/MKL/OpenBLAS environment."""
    import torch

    if torch.get_num_threads() != p.threads:
        torch.set_num_threads(p.threads)
    for var in ENV_VARS:
        os.environ[var] = str(p.threads)
    try:  # numpy's BLAS (already loaded: the environment no longer reaches it)
        from threadpoolctl import threadpool_limits

        _state["tpc"] = threadpool_limits(limits=p.threads)
    except Exception:  # noqa: BLE001 - optional helper; torch is what matters
        pass
    _state["applied"] = p


def keep_heap(threshold: int = 32 * 2**20) -> bool:
    """glibc only: serve allocations below ``threshold`` bytes from the heap and never trim it (mallopt
    M_MMAP_THRESHOLD, M_TRIM_THRESHOLD), so freed temporaries are reused instead of unmapped and faulted in
    again. Once per process; False where it does not apply (another C library)."""
    if _state.get("heap") is not None:
        return bool(_state["heap"])
    ok = False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = bool(libc.mallopt(m_mmap_threshold, int(threshold))) and bool(libc.mallopt(m_trim_threshold, 2**30))
    except (OSError, AttributeError):
        ok = False
    _state["heap"] = ok
    log.debug("malloc: keep temporaries below %d MiB in the heap: %s", threshold >> 20, ok)
    return ok


def configure(requested: int | str | None = None, *, scan: bool = False) -> ThreadPlan:
    """Decide and apply the thread plan at start (CLI, gadget, benchmark); logs it once (INFO).

    scan: a setting for one scan only (a scan's ``threads`` property under serve); :func:`restore` goes back
    to the process's own choice afterwards."""
    _state["requested"] = requested
    if not scan:
        _state["default"] = requested
    keep_heap()
    p = plan(requested)
    try:
        import torch

        torch.set_num_interop_threads(1)  # only possible before any inter-op work; we use none
    except RuntimeError:
        pass
    apply(p)
    log.info("threads: %s", p.describe())
    return p


def rebalance() -> ThreadPlan | None:
    """Re-plan an 'auto' configuration (a scan or a batch of slices starts): other scans may have started or
    ended. Logs only a change. No-op for explicit counts or before :func:`configure`."""
    current: ThreadPlan | None = _state["applied"]
    if current is None or current.source != "auto":
        return current
    p = plan(_state["requested"])
    if p.threads != current.threads:
        log.info("threads: %d -> %s", current.threads, p.describe())
        apply(p)
    else:
        _state["applied"] = p
    return p


def restore() -> ThreadPlan:
    """After a scan that asked for its own threads: the process's own choice again."""
    return configure(_state["default"])


def current() -> ThreadPlan | None:
    """The applied plan, or None before :func:`configure`."""
    return _state["applied"]


__all__ = ["ThreadPlan", "ThreadsError", "ScanSlot", "usable_cpus", "cgroup_cpu_limit", "affinity_cpus",
           "idle_cpus", "active_scans", "parse_threads", "plan", "apply", "configure", "rebalance", "restore", "current", "keep_heap"]
