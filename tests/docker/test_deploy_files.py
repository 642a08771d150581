"""The Docker deployment's files, without a Docker engine (``make docker-check`` builds and runs them for real):
the entrypoint's Gadgetron defaults, the health check's view of what runs, the compose files' ports and
hardening, the Dockerfile's one shared install stage, the build context, the pinned versions, and
``docker/check.py compare``."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import socket
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"


def _fake_bin(tmp: Path, name: str, body: str = 'printf "%s\\n" "$0" "$@" > "$FAKE_OUT"') -> None:
    tmp.mkdir(exist_ok=True)
    exe = tmp / name
    exe.write_text(f"#!/usr/bin/env bash\n{body}\n")
    exe.chmod(0o755)


def _run(script: str, args: list[str], tmp: Path, **env: str) -> subprocess.CompletedProcess:
    base = {"PATH": f"{tmp / 'bin'}:/usr/bin:/bin", "HOME": str(tmp / "home"), "FAKE_OUT": str(tmp / "out")}
    return subprocess.run(["bash", str(DOCKER / script), *args], env={**base, **env}, capture_output=True,
                          text=True, timeout=30)


def _calls(tmp: Path) -> list[str]:
    return (tmp / "out").read_text().split("\n")[1:-1]


# ------------------------------------------------------------------------------------------------ entrypoint


def test_entrypoint_starts_gadgetron_with_port_workdir_and_no_storage_when_there_is_none(tmp_path):
    _fake_bin(tmp_path / "bin", "gadgetron")
    r = _run("entrypoint.sh", [], tmp_path)
    assert r.returncode == 0, r.stderr
    assert _calls(tmp_path) == ["-p", "9002", "-W", f"{tmp_path}/home/gadgetron", "-d", "true"]
    assert (tmp_path / "home" / "gadgetron").is_dir() and "no storage server" in r.stderr


def test_entrypoint_keeps_given_options_and_uses_a_storage_server_when_there_is_one(tmp_path):
    _fake_bin(tmp_path / "bin", "gadgetron")
    _fake_bin(tmp_path / "bin", "mrd-storage-server", "true")
    r = _run("entrypoint.sh", ["gadgetron", "--port=9100", "-W", "/w"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert _calls(tmp_path) == ["--port=9100", "-W", "/w"]
    r = _run("entrypoint.sh", ["-p", "9005"], tmp_path, GADGETRON_PORT="1")
    assert _calls(tmp_path) == ["-p", "9005", "-W", f"{tmp_path}/home/gadgetron"]


def test_entrypoint_runs_any_other_command_as_given(tmp_path):
    _fake_bin(tmp_path / "bin", "scoremri")
    r = _run("entrypoint.sh", ["scoremri", "serve", "--port", "9003"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert _calls(tmp_path) == ["serve", "--port", "9003"]


# ------------------------------------------------------------------------------------------------ healthcheck


def _proc(root: Path, pid: int, argv: list[str]) -> None:
    (root / str(pid)).mkdir(parents=True)
    (root / str(pid) / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")


def test_healthcheck_asks_a_running_serve_with_its_protocol_and_port(tmp_path):
    _fake_bin(tmp_path / "bin", "scoremri")
    proc = tmp_path / "proc"
    _proc(proc, 1, ["/sbin/docker-init", "--", "scoremri-entrypoint", "scoremri", "serve"])  # not a server
    _proc(proc, 7, ["/opt/venv/bin/python", "/opt/venv/bin/scoremri", "serve", "--protocol", "mrd", "--host",
                    "0.0.0.0", "--port", "9002", "--config-dir", "/config", "--preset", "fast"])
    r = _run("healthcheck.sh", [], tmp_path, PROC_ROOT=str(proc))
    assert r.returncode == 0, r.stderr
    assert _calls(tmp_path) == ["serve", "--check", "--protocol", "mrd", "--host", "127.0.0.1", "--port", "9002",
                                "--timeout", "8"]


def test_healthcheck_probes_gadgetrons_port(tmp_path):
    proc = tmp_path / "proc"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        _proc(proc, 12, ["gadgetron", "-p", str(port), "-W", "/w", "-d", "true"])
        r = _run("healthcheck.sh", [], tmp_path, PROC_ROOT=str(proc))
        assert r.returncode == 0, r.stderr
    r = _run("healthcheck.sh", [], tmp_path, PROC_ROOT=str(proc))  # listener gone
    assert r.returncode == 1 and f"does not accept connections on port {port}" in r.stderr


def test_healthcheck_is_unhealthy_when_nothing_runs(tmp_path):
    proc = tmp_path / "proc"
    _proc(proc, 1, ["bash"])
    r = _run("healthcheck.sh", [], tmp_path, PROC_ROOT=str(proc))
    assert r.returncode == 1 and "neither scoremri serve nor gadgetron" in r.stderr


# ------------------------------------------------------------------------------------------------ compose


def _compose(name: str) -> dict:
    return yaml.safe_load((DOCKER / name).read_text())


def test_compose_publishes_gadgetron_and_mrd_on_the_scanner_address_only_and_never_serve():
    svc = _compose("compose.yaml")["services"]
    assert set(svc) == {"gadgetron", "scoremri", "mrd"}
    assert svc["gadgetron"]["ports"] == ["${SCANNER_IP:-127.0.0.1}:${GADGETRON_PORT:-9002}:9002"]
    assert svc["mrd"]["ports"] == ["${SCANNER_IP:-127.0.0.1}:${MRD_PORT:-9012}:9002"]
    s = svc["scoremri"]
    assert "ports" not in s and "expose" not in s and s["network_mode"] == "service:gadgetron"
    cmd = s["command"]
    assert cmd[:2] == ["scoremri", "serve"] and cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert cmd[cmd.index("--port") + 1] == "9003"
    assert svc["mrd"]["profiles"] == ["mrd"]  # not started by a plain `up`


def test_compose_services_are_hardened_and_health_checked():
    for name, s in _compose("compose.yaml")["services"].items():
        assert s["read_only"] is True and s["cap_drop"] == ["ALL"], name
        assert "no-new-privileges:true" in s["security_opt"] and s["init"] is True, name
        assert s["healthcheck"]["test"][0] in ("CMD", "CMD-SHELL") and "user" not in s, name
    # Gadgetron is healthy only when the warm serve behind it answers too
    assert "scoremri serve --check --port 9003" in _compose("compose.yaml")["services"]["gadgetron"]["healthcheck"]["test"][1]


def test_gpu_overlay_gives_serve_and_mrd_one_gpu_and_cuda():
    svc = _compose("compose.gpu.yaml")["services"]
    for name in ("scoremri", "mrd"):
        dev = svc[name]["deploy"]["resources"]["reservations"]["devices"][0]
        assert dev["driver"] == "nvidia" and dev["count"] == 1 and dev["capabilities"] == ["gpu"]
        cmd = svc[name]["command"]
        assert cmd[cmd.index("--device") + 1] == "cuda"
    base = _compose("compose.yaml")["services"]["scoremri"]["command"]
    assert [a for a in svc["scoremri"]["command"] if a != "cuda"] == [a for a in base if "SCOREMRI_DEVICE" not in a]


def test_distributed_overlay_lists_two_unpublished_workers_that_run_gadgetron():
    svc = _compose("compose.distributed.yaml")["services"]
    assert set(svc) == {"gadgetron", "worker1", "worker2"}
    cmd = svc["gadgetron"]["environment"]["GADGETRON_REMOTE_WORKER_COMMAND"]
    # run without a shell: `echo` and ONE argument whose inner quotes are escaped, printing the JSON list
    prog, arg = cmd.split(" ", 1)
    assert prog == "echo" and arg.startswith('"') and arg.endswith('"') and " " not in arg
    assert json.loads(arg[1:-1].replace('\\"', '"')) == ["worker1:9002", "worker2:9002"]
    for name in ("worker1", "worker2"):
        w = svc[name]
        assert "ports" not in w and w["command"] == ["gadgetron", "-p", "9002"]
        assert w["read_only"] is True and w["cap_drop"] == ["ALL"] and w["init"] is True
    gpu = _compose("compose.distributed.gpu.yaml")["services"]
    ids = [gpu[n]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] for n in ("worker1", "worker2")]
    assert ids == [["0"], ["1"]]  # one GPU each, not both the first


# ------------------------------------------------------------------------------------------------ Dockerfile


def _stages() -> list[tuple[str, str, list[str]]]:
    """(name, base, instructions) of each stage of docker/Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", (DOCKER / "Dockerfile").read_text())
    stages: list[tuple[str, str, list[str]]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.match(r"FROM\s+(\S+)\s+AS\s+(\S+)", line, re.I)
        if m:
            stages.append((m.group(2), m.group(1), []))
        elif stages:
            stages[-1][2].append(line)
    return stages


def test_dockerfile_flavours_differ_only_in_their_base_stage():
    stages = {name: (base, ins) for name, base, ins in _stages()}
    assert list(stages) == ["base-gpu", "base-cpu", "install", "openrecon", "scoremri"]  # scoremri: the default
    assert stages["base-gpu"][0] == "${GADGETRON_IMAGE}" and stages["base-cpu"][0] == "${DEBIAN_IMAGE}"
    assert stages["install"][0] == "base-${FLAVOR}"
    assert stages["openrecon"][0] == stages["scoremri"][0] == "install"
    runs = [(n, i) for n, (_, ins) in stages.items() for i in ins if i.startswith("RUN")]
    pip = [n for n, i in runs if "pip install" in i]
    assert pip == ["install"], "scoremri is installed in one step shared by both flavours"
    for base in ("base-gpu", "base-cpu"):  # the bases say where Python and Gadgetron are, nothing else of ours
        env = " ".join(i for i in stages[base][1] if i.startswith("ENV"))
        assert "SCOREMRI_PYTHON=" in env and "GADGETRON_HOME=" in env
        assert not any("scoremri" in i.lower() and i.startswith(("COPY", "RUN")) for i in stages[base][1])


def test_dockerfile_user_health_and_secret_handling():
    stages = {name: ins for name, _, ins in _stages()}
    user = [i.split()[1] for i in stages["install"] if i.startswith("USER ")][-1]
    assert re.fullmatch(r"[1-9][0-9]*:[1-9][0-9]*", user), user  # numeric, not root
    assert any(i.startswith("HEALTHCHECK") for i in stages["install"])
    pip = next(i for i in stages["install"] if "pip install" in i)
    assert "--mount=type=secret,id=pip-ca,required=false" in pip  # the CA bundle: a secret, never a layer
    text = (DOCKER / "Dockerfile").read_text()
    assert not re.search(r"^(COPY|ADD)\s.*(\.crt|\.pem|ssl|cert)", text, re.M | re.I)
    assert stages["openrecon"][0].startswith("ENTRYPOINT") and '"--protocol", "mrd"' in stages["openrecon"][0]


def test_build_context_holds_what_the_dockerfile_copies():
    ignore = (REPO / ".dockerignore").read_text().splitlines()
    assert ignore[next(i for i, x in enumerate(ignore) if x and not x.startswith("#"))] == "*"
    allowed = {x[1:].rstrip("/") for x in ignore if x.startswith("!")}
    text = re.sub(r"\\\n", " ", (DOCKER / "Dockerfile").read_text())
    sources = []
    for line in text.splitlines():
        if line.startswith("COPY") and "--from" not in line:
            sources += line.split()[1:-1]
        sources += re.findall(r"--mount=type=bind,source=(\S+?),", line)
    for src in sources:
        assert any(src == a or src.startswith(a + "/") for a in allowed), f"{src} is not in the build context"
        assert (REPO / src).exists() or src.startswith("docker/stage"), src


def test_constraints_pin_every_runtime_dependency_for_both_pythons():
    setup = (REPO / "setup.py").read_text()
    block = setup[setup.index("install_requires=[") : setup.index("]", setup.index("install_requires=["))]
    deps = {re.split(r"[<>=!\[]", d)[0].lower() for d in re.findall(r'"([^"]+)"', block)} - {"torch"}
    pins: dict[str, set[str]] = {}
    for line in (DOCKER / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name = line.split("==")[0].lower().replace("_", "-")
            marker = line.split(";")[1].strip() if ";" in line else "all"
            pins.setdefault(name, set()).add(marker)
    for d in deps:
        m = pins.get(d.replace("_", "-"))
        assert m, f"{d} is not pinned in docker/constraints.txt"
        assert m == {"all"} or m == {'python_version >= "3.11"', 'python_version < "3.11"'}, (d, m)


# ------------------------------------------------------------------------------------------------ check.py


def _check_module():
    spec = importlib.util.spec_from_file_location("docker_check", DOCKER / "check.py")
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    return mod


def _image_file(path: Path, group: str, name: str, data: np.ndarray, slices: list[int]) -> None:
    import h5py

    head = np.zeros(len(slices), dtype=[("image_series_index", "<u2"), ("slice", "<u2"),
                                        ("attribute_string_len", "<u4")])
    head["image_series_index"] = 1
    head["slice"] = slices
    cplx = np.zeros(data.shape, dtype=[("real", "<f4"), ("imag", "<f4")])
    cplx["real"], cplx["imag"] = data.real, data.imag
    with h5py.File(path, "a") as h:
        g = h.create_group(f"{group}/{name}")
        g["data"] = cplx
        g["header"] = head


def test_check_compare_passes_equal_images_and_names_what_differs(tmp_path, capsys):
    check = _check_module()
    rng = np.random.default_rng(0)
    ref = (rng.standard_normal((3, 1, 1, 8, 8)) + 1j * rng.standard_normal((3, 1, 1, 8, 8))).astype(np.complex64)
    _image_file(tmp_path / "ref.h5", "ref", "image_1", ref, [0, 1, 2])
    _image_file(tmp_path / "same.h5", "out", "images_1", ref * (1 + 1e-6), [0, 1, 2])  # other group name
    _image_file(tmp_path / "off.h5", "out", "image_1", ref + 1e-3 * np.abs(ref).max(), [0, 1, 2])
    _image_file(tmp_path / "swap.h5", "out", "image_1", ref, [0, 2, 1])  # slices 1 and 2 swapped
    _image_file(tmp_path / "order.h5", "out", "image_1", ref[[2, 0, 1]], [2, 0, 1])  # arrival order only
    _image_file(tmp_path / "miss.h5", "out", "image_1", ref, [0, 1, 3])
    assert check.compare(str(tmp_path / "same.h5"), "out", str(tmp_path / "ref.h5"), "ref", 1e-4) == []
    off = check.compare(str(tmp_path / "off.h5"), "out", str(tmp_path / "ref.h5"), "ref", 1e-4)
    assert len(off) == 1 and "images differ by 1.00e-03" in off[0]
    swap = check.compare(str(tmp_path / "swap.h5"), "out", str(tmp_path / "ref.h5"), "ref", 1e-4)
    assert len(swap) == 1 and "images differ" in swap[0]
    assert check.compare(str(tmp_path / "order.h5"), "out", str(tmp_path / "ref.h5"), "ref", 1e-4) == []
    miss = check.compare(str(tmp_path / "miss.h5"), "out", str(tmp_path / "ref.h5"), "ref", 1e-4)
    assert miss == ["series 1: images by ['slice']: [(0,), (1,), (3,)] vs [(0,), (1,), (2,)]"]
    assert "max |A-B| / max |B|" in capsys.readouterr().out


@pytest.mark.parametrize("script", ["entrypoint.sh", "healthcheck.sh", "build.sh", "make-base.sh", "check.sh"])
def test_scripts_parse_and_are_executable(script):
    path = DOCKER / script
    assert os.access(path, os.X_OK), f"{script} is not executable"
    r = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
