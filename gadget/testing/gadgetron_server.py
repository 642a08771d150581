"""The real Gadgetron in tests and benchmarks: find it, start a server, run its client, stop everything by PID.

- :func:`find_gadgetron`: the Gadgetron install to use, found by :mod:`scoremri.gadget.testing.tools`
  (``$SCOREMRI_GADGETRON``, else ``../shared/gadgetron`` beside the repository, else ``gadgetron`` on PATH;
  a tree whose library symlinks were flattened into small files runs with ``LD_LIBRARY_PATH`` on real links).
  It must answer ``gadgetron --info``; else :class:`GadgetronUnavailable` says why.
- :class:`GadgetronServer`: one server on a free port, its own ``-W`` working folder, ``-d true`` (no storage
  server), the interpreter of this process first on its PATH (so ``python -m gadgetron`` children import
  this scoremri), in its own session so that every process it starts -- connection forks, ``python -m
  gadgetron`` children -- can be found (:meth:`GadgetronServer.session_processes`) and ended by PID.
- :func:`run_client`: ``gadgetron_ismrmrd_client`` with a timeout (killed, never left running).
- :class:`ServeProcess`: a ``scoremri serve`` process (connect mode) with health polling and stop by PID.
- :func:`pipeline_variant`: a copy of a stream XML with ``<external>`` properties or the connect port changed.
- :func:`compare_image_headers`: Gadgetron's integration-test rules for image headers.

Test and benchmark support only; nothing in the product imports it.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from . import tools

log = logging.getLogger(__name__)


class GadgetronUnavailable(RuntimeError):
    """No usable Gadgetron here; the message says what was tried and why it failed."""


@dataclass(frozen=True)
class GadgetronInstall:
    """A Gadgetron tree: ``bin/gadgetron``, ``bin/gadgetron_ismrmrd_client``, its libraries and ``share/``."""

    home: Path
    source: str  # where it was found (for messages)

    @property
    def gadgetron(self) -> Path:
        return self.home / "bin" / "gadgetron"

    @property
    def client(self) -> Path:
        return self.home / "bin" / "gadgetron_ismrmrd_client"

    def tool(self, name: str) -> Path:
        """Another program of the tree (e.g. ``ismrmrd_generate_cartesian_shepp_logan``, ISMRMRD 1.14)."""
        p = self.home / "bin" / name
        if not p.exists():
            raise GadgetronUnavailable(f"{p}: not in this Gadgetron tree ({self.source})")
        return p

    def config(self, name: str) -> Path:
        """A stream configuration shipped in ``share/gadgetron/config``."""
        return self.home / "share" / "gadgetron" / "config" / name

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """The environment to run the tree's programs with (``tools.gadgetron_env``)."""
        return tools.gadgetron_env(self.gadgetron, base)


def _answers_info(exe: Path) -> str | None:
    """None when ``exe --info`` works, else the reason (its last output line)."""
    try:
        r = subprocess.run([str(exe), "--info"], capture_output=True, text=True, timeout=60,
                           env=tools.gadgetron_env(exe))
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{type(e).__name__}: {e}"
    if r.returncode == 0:
        return None
    lines = (r.stderr + r.stdout).strip().splitlines()
    return f"exit {r.returncode}: {lines[-1] if lines else 'no output'}"


@lru_cache(maxsize=1)
def find_gadgetron() -> GadgetronInstall:
    """The Gadgetron install to use (see the module docstring). Raises GadgetronUnavailable."""
    exe = tools.gadgetron_bin("gadgetron")
    if exe is None:
        raise GadgetronUnavailable(
            f"no Gadgetron: $SCOREMRI_GADGETRON is unset, no {tools.SHARED / 'gadgetron' / 'bin'} and no "
            "'gadgetron' on PATH")
    home = exe.resolve().parent.parent
    for name in ("gadgetron_ismrmrd_client",):
        if not (home / "bin" / name).exists():
            raise GadgetronUnavailable(f"{home / 'bin'}: no {name} beside gadgetron")
    why = _answers_info(exe)
    if why is not None:
        raise GadgetronUnavailable(f"{exe}: 'gadgetron --info' failed ({why}); runtime libraries missing? "
                                   f"run {home / 'install-runtime.sh'} as root")
    return GadgetronInstall(home, str(exe))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_listening(port: int) -> bool:
    """A socket of this machine listens on ``port`` (read from /proc/net/tcp*, without connecting: Gadgetron
    logs an error for every connection that sends nothing)."""
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(name).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if len(f) > 3 and f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port:
                return True
    return False


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace").strip()
    except OSError:
        return ""


def session_processes(sid: int) -> list[tuple[int, str]]:
    """(pid, command line) of the live processes in session ``sid`` (zombies excluded)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()  # state ppid pgrp session ...
        if len(fields) > 3 and int(fields[3]) == sid and fields[0] != "Z":
            out.append((int(d.name), _cmdline(int(d.name))))
    return sorted(out)


def _kill_pids(pids: Iterable[int], sig: int = signal.SIGKILL) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def wait_for(pred: Callable[[], Any], timeout: float, interval: float = 0.1) -> Any:
    """Poll ``pred`` until it returns something truthy (returned) or ``timeout`` s pass (returns the falsy)."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v or time.monotonic() > deadline:
            return v
        time.sleep(interval)


@dataclass
class GadgetronServer:
    """A real Gadgetron server for one test: free port, own ``-W`` folder, ``-d true``, log in ``workdir``.

    ``python_bin``: the folder put first on the server's PATH (default: this interpreter's, i.e. the venv
    with scoremri). ``worker_command``: ``GADGETRON_REMOTE_WORKER_COMMAND`` (distributed mode). ``env``:
    extra environment. Use as a context manager; :meth:`stop` ends it and every process of its session.
    """

    workdir: Path
    install: GadgetronInstall | None = None
    port: int = 0
    python_bin: str | None = None
    worker_command: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    name: str = "gadgetron"
    proc: subprocess.Popen | None = None
    leftover: list[tuple[int, str]] = field(default_factory=list)  # processes stop() had to kill

    def __post_init__(self) -> None:
        self.install = self.install or find_gadgetron()
        self.workdir = Path(self.workdir)
        self.port = self.port or free_port()

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.name}.log"

    def start(self, timeout: float = 60.0) -> "GadgetronServer":
        w = self.workdir / f"{self.name}-work"
        w.mkdir(parents=True, exist_ok=True)
        env = self.install.env()
        env["PATH"] = os.pathsep.join([self.python_bin or os.path.dirname(sys.executable), env.get("PATH", "")])
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        env.setdefault("OMP_NUM_THREADS", "1")
        env.setdefault("GADGETRON_EXTERNAL_LOG_LEVEL", "INFO")
        if self.worker_command is not None:
            env["GADGETRON_REMOTE_WORKER_COMMAND"] = self.worker_command
        env.update(self.env)
        self._logf = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [str(self.install.gadgetron), "-p", str(self.port), "-d", "true", "-W", str(w)],
            stdout=self._logf, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=str(w),
        )
        ok = wait_for(lambda: self.proc.poll() is not None or port_listening(self.port), timeout)
        if self.proc.poll() is not None or not ok:
            text = self.log()[-3000:]
            self.stop()
            raise RuntimeError(f"Gadgetron did not start on port {self.port} within {timeout:.0f} s: {text}")
        return self

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def session_processes(self) -> list[tuple[int, str]]:
        """Live processes started by this server (itself, connection forks, ``python -m gadgetron``)."""
        return session_processes(self.proc.pid) if self.proc is not None else []

    def children(self) -> list[tuple[int, str]]:
        """The live processes of the session other than the server itself."""
        pid = self.proc.pid if self.proc is not None else -1
        return [p for p in self.session_processes() if p[0] != pid]

    def python_children(self) -> list[tuple[int, str]]:
        return [p for p in self.children() if "-m gadgetron" in p[1]]

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the server process only (its connection forks and children live on until stop())."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self, timeout: float = 10.0, grace: float = 5.0) -> list[tuple[int, str]]:
        """SIGTERM the server, give its connection processes ``grace`` seconds to finish, then kill (by PID)
        whatever of its session is left; returns those leftovers."""
        if self.proc is None:
            return []
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        wait_for(lambda: not session_processes(self.proc.pid), grace)
        left = [p for p in session_processes(self.proc.pid) if p[0] != self.proc.pid]
        if left:
            log.warning("%s: killing processes left after the server stopped: %s", self.name, left)
            _kill_pids(pid for pid, _ in left)
            wait_for(lambda: not session_processes(self.proc.pid), 10)
        self.leftover += left
        if getattr(self, "_logf", None) is not None:
            self._logf.close()
            self._logf = None
        return left

    def __enter__(self) -> "GadgetronServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


@dataclass
class ClientResult:
    returncode: int | None
    output: str
    seconds: float
    timed_out: bool


def run_client(
    port: int, raw: str | Path, out: str | Path, *, xml: str | Path | None = None, config_name: str | None = None,
    group: str = "dataset", in_group: str = "dataset", timeout: float = 120.0,
    install: GadgetronInstall | None = None, on_start: Callable[[subprocess.Popen], Any] | None = None,
) -> ClientResult:
    """``gadgetron_ismrmrd_client -p PORT -f RAW -g IN_GROUP (-C XML | -c NAME) -o OUT -G GROUP``.

    Killed (by PID) after ``timeout`` seconds (``timed_out``). ``on_start(proc)`` runs once the client
    started (fault tests kill it from there)."""
    install = install or find_gadgetron()
    if (xml is None) == (config_name is None):
        raise ValueError("give exactly one of xml= and config_name=")
    cmd = [str(install.client), "-a", "127.0.0.1", "-p", str(port), "-f", str(raw), "-g", in_group,
           "-o", str(out), "-G", group]
    cmd += ["-C", str(xml)] if xml is not None else ["-c", config_name]
    t0 = time.monotonic()
    with tempfile.TemporaryFile() as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=install.env(), start_new_session=True)
        if on_start is not None:
            on_start(proc)
        timed_out = False
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            proc.kill()
            proc.wait(10)
        logf.seek(0)
        text = logf.read().decode("utf-8", "replace")
    return ClientResult(proc.returncode, text, time.monotonic() - t0, timed_out)


class ServeProcess:
    """``scoremri serve`` on a free port (``extra``: its options, e.g. ``--protocol mrd``), one torch thread,
    in its own session; stopped by PID (SIGTERM, then SIGKILL, then whatever it left)."""

    def __init__(self, *extra: str, port: int | None = None, device: str = "cpu", env: dict[str, str] | None = None,
                 timeout: float = 120.0) -> None:
        self.port = port or free_port()
        self.log = tempfile.TemporaryFile()
        penv = dict(os.environ, OMP_NUM_THREADS="1")  # one torch thread, as the Gadgetron children get
        penv.update(env or {})
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "scoremri.gadget.cli", "serve", "--port", str(self.port), "--device", device,
             *extra],
            stdout=self.log, stderr=subprocess.STDOUT, env=penv, start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve exited with {self.proc.returncode}: {self.text()}")
            try:
                self.health()
                return
            except (OSError, ValueError):
                if time.monotonic() > deadline:
                    self.stop()
                    raise
                time.sleep(0.3)

    def health(self) -> dict:
        from scoremri.gadget.server import check_health

        return check_health("127.0.0.1", self.port, 5.0)

    def text(self) -> str:
        self.log.seek(0)
        return self.log.read().decode("utf-8", "replace")

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)
        finally:
            left = [p for p in session_processes(self.proc.pid) if p[0] != self.proc.pid]
            _kill_pids(pid for pid, _ in left)

    def __enter__(self) -> "ServeProcess":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


# ------------------------------------------------------------------------------------------ pipelines


def pipeline_variant(src: str | Path, dest: str | Path, *, properties: dict[str, str] | None = None,
                     connect_port: int | None = None) -> Path:
    """Write a copy of a Gadgetron 4 stream XML with ``<external><configuration>`` properties set (added
    or replaced, ``name``/``value`` attributes) and/or ``<connect port=...>`` changed."""
    tree = ET.parse(str(src))
    externals = list(tree.getroot().iter("external"))
    if not externals:
        raise ValueError(f"{src}: no <external> element")
    for ext in externals:
        if connect_port is not None:
            con = ext.find("connect")
            if con is None:
                raise ValueError(f"{src}: <external> has no <connect> element")
            con.set("port", str(connect_port))
        if properties:
            conf = ext.find("configuration")
            if conf is None:
                conf = ET.SubElement(ext, "configuration")
            for name, value in properties.items():
                for p in conf.findall("property"):
                    if p.get("name") == name:
                        conf.remove(p)
                ET.SubElement(conf, "property", name=name, value=str(value))
    dest = Path(dest)
    tree.write(str(dest), encoding="utf-8", xml_declaration=True)
    return dest


# ------------------------------------------------------------------------------------------ images


def _equals(a: Any, b: Any) -> bool:
    return a == b


def _approx(a: Any, b: Any, tol: float = 1e-6) -> bool:
    return abs(float(a) - float(b)) <= tol


def _each(rule: Callable[[Any, Any], bool]) -> Callable[[Any, Any], bool]:
    return lambda a, b: len(list(a)) == len(list(b)) and all(rule(x, y) for x, y in zip(a, b))


# Gadgetron's test/integration/run_gadgetron_test.py (validate_image_header); acquisition_time_stamp,
# physiology_time_stamp, image_series_index and attribute_string_len are ignored there too.
HEADER_RULES: dict[str, Callable[[Any, Any], bool]] = {
    "version": _equals, "data_type": _equals, "flags": _equals, "measurement_uid": _equals,
    "matrix_size": _each(_equals), "field_of_view": _each(_approx), "channels": _equals,
    "position": _each(_approx), "read_dir": _each(_approx), "phase_dir": _each(_approx),
    "slice_dir": _each(_approx), "patient_table_position": _each(_approx),
    "average": _equals, "slice": _equals, "contrast": _equals, "phase": _equals, "repetition": _equals,
    "set": _equals, "image_type": _equals, "image_index": _equals,
    "user_int": _each(_equals), "user_float": _each(_approx),
}


def compare_image_headers(out: Any, ref: Any, *, skip: Sequence[str] = ()) -> list[str]:
    """Fields of two ismrmrd.Image headers that break Gadgetron's integration-test rules (empty: equal)."""
    a, b = out.getHead(), ref.getHead()
    bad = []
    for name, rule in HEADER_RULES.items():
        if name in skip:
            continue
        va, vb = getattr(a, name), getattr(b, name)
        if not rule(va, vb):
            bad.append(f"{name}: {_show(va)} != {_show(vb)}")
    return bad


def _show(v: Any) -> Any:
    try:
        return tuple(v)
    except TypeError:
        return v
