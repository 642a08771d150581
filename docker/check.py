"""Helpers of ``docker/check.sh`` (``make docker-check``), run with the repository's venv.

    python docker/check.py layers IMAGE          # no secrets, host CA certificates or build-only files in any layer
    python docker/check.py compare OUT.h5 GROUP REF.h5 GROUP [--tol 1e-4] [--skip FIELD]   # images equal
    python docker/check.py downsample IN.npy OUT.npy FACTOR                  # block mean, scaled to max 1

Exit 0 when the check passes, 1 with one line per problem on stderr.
"""
from __future__ import annotations

import argparse
import glob
import json
import re
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import IO, Iterator

PEM = re.compile(rb"-----BEGIN CERTIFICATE-----(.*?)-----END CERTIFICATE-----", re.S)
# file names that hold credentials wherever they are
SECRET_NAMES = {".netrc", ".pypirc", "pip.conf", "pip.ini", ".git-credentials", "id_rsa", "id_ed25519", "id_ecdsa"}
SECRET_ENV = re.compile(r"(TOKEN|SECRET|PASSWORD|PASSWD|API_KEY|PIP_CERT|REQUESTS_CA_BUNDLE|SSL_CERT_FILE|CURL_CA_BUNDLE)", re.I)
MAX_SCAN = 8 << 20  # files up to 8 MB are read and searched for certificates


def _certs(blob: bytes) -> set[bytes]:
    return {re.sub(rb"\s+", b"", m) for m in PEM.findall(blob)}


def host_only_certs() -> dict[bytes, str]:
    """Certificates the host trusts beyond Debian's public (Mozilla) set: a site's or a proxy's own CAs."""
    public: set[bytes] = set()
    for f in glob.glob("/usr/share/ca-certificates/mozilla/*.crt"):
        public |= _certs(Path(f).read_bytes())
    found: dict[bytes, str] = {}
    for bundle in ("/etc/ssl/certs/ca-certificates.crt",):
        if Path(bundle).exists():
            for c in _certs(Path(bundle).read_bytes()) - public:
                found[c] = bundle
    for f in glob.glob("/usr/local/share/ca-certificates/**/*.crt", recursive=True):
        for c in _certs(Path(f).read_bytes()):
            found[c] = f
    return found


def _layers(image: str) -> Iterator[tuple[str, tarfile.TarFile]]:
    """Each layer of ``docker save IMAGE`` as an open (streamed) tar."""
    proc = subprocess.Popen(["docker", "save", image], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    with tarfile.open(fileobj=proc.stdout, mode="r|") as outer:
        for m in outer:
            if m.isfile() and (m.name.endswith("layer.tar") or m.name.startswith("blobs/")):
                f: IO[bytes] | None = outer.extractfile(m)
                if f is None:
                    continue
                try:
                    with tarfile.open(fileobj=f, mode="r|") as layer:
                        yield m.name, layer
                except tarfile.ReadError:  # an OCI blob that is not a layer (config, manifest)
                    continue
    if proc.wait() != 0:
        raise SystemExit(f"docker save {image} failed")


def check_layers(image: str) -> list[str]:
    problems: list[str] = []
    host = host_only_certs()
    n_layers = n_files = n_scanned = 0
    for name, layer in _layers(image):
        n_layers += 1
        for m in layer:
            n_files += 1
            path = m.name.lstrip("./")
            base = path.rsplit("/", 1)[-1]
            if path.startswith("run/secrets/") and m.isfile() and m.size > 0:
                problems.append(f"layer {name}: a build secret was stored: /{path}")
            if base in SECRET_NAMES and m.isfile() and m.size > 0:
                problems.append(f"layer {name}: credentials file /{path}")
            if path.startswith(".docker/") or "/.docker/config.json" in path:
                problems.append(f"layer {name}: docker credentials /{path}")
            if (base.startswith("torch-") and base.endswith(".whl")) or path.startswith(("tmp/stage/", "opt/scoremri/docker/")):
                problems.append(f"layer {name}: a build-only file was stored: /{path}")
            if m.isfile() and 0 < m.size <= MAX_SCAN and host:
                f = layer.extractfile(m)
                blob = f.read() if f else b""
                if b"BEGIN CERTIFICATE" in blob:
                    n_scanned += 1
                    for c in _certs(blob) & host.keys():
                        problems.append(f"layer {name}: /{path} holds the host's CA certificate from {host[c]}")
    info = json.loads(subprocess.run(["docker", "image", "inspect", image], capture_output=True, text=True,
                                     check=True).stdout)[0]
    for env in info["Config"].get("Env") or []:
        if SECRET_ENV.search(env.split("=", 1)[0]):
            problems.append(f"image environment carries {env.split('=', 1)[0]}")
    hist = subprocess.run(["docker", "history", "--no-trunc", "--format", "{{.CreatedBy}}", image],
                          capture_output=True, text=True, check=True).stdout
    if "BEGIN CERTIFICATE" in hist or "ca-certificates.crt" in hist:
        problems.append("docker history shows a certificate or the host's CA bundle in a build step")
    print(f"layers: {n_layers} layers, {n_files} entries, {n_scanned} files with certificates searched for "
          f"{len(host)} host-only CA certificates; user {info['Config'].get('User')!r}; "
          f"exposed {sorted((info['Config'].get('ExposedPorts') or {}).keys())}; "
          f"healthcheck {(info['Config'].get('Healthcheck') or {}).get('Test')}")
    if not info["Config"].get("User") or info["Config"]["User"].split(":")[0] in ("0", "root"):
        problems.append(f"image runs as root (User={info['Config'].get('User')!r})")
    if not info["Config"].get("Healthcheck"):
        problems.append("image has no HEALTHCHECK")
    return problems


def _images(path: str, group: str) -> dict[str, tuple]:
    import h5py
    import numpy as np

    out = {}
    with h5py.File(path, "r") as h:
        if group not in h:
            raise SystemExit(f"{path}: no group '{group}' (groups: {list(h.keys())})")
        for g in h[group].values():  # keyed by series: clients name the groups differently (image_1, images_1)
            if not isinstance(g, h5py.Group) or "data" not in g:
                continue
            d = g["data"][()]
            data = d["real"] + 1j * d["imag"] if d.dtype.names else d.astype(np.complex128)
            head = g["header"][()]
            out[f"series {int(head['image_series_index'][0])}"] = (data, head)
    return out


COUNTERS = ("slice", "contrast", "phase", "repetition", "set", "average")


def compare(a_path: str, a_group: str, b_path: str, b_group: str, tol: float,
            skip: tuple[str, ...] = ()) -> list[str]:
    """Images of A equal those of B: same series, and in each the same images (matched by their counters:
    slice, contrast, ...; arrival order may differ), headers equal but for ``skip``, complex data to ``tol``
    of max |B|. ``attribute_string_len`` (the meta text's length; older ismrmrd-python writers leave 0) is
    never compared."""
    import numpy as np

    a, b = _images(a_path, a_group), _images(b_path, b_group)
    problems: list[str] = []
    if sorted(a) != sorted(b):
        return [f"series differ: {sorted(a)} vs {sorted(b)}"]
    ignore = {"attribute_string_len", *skip}
    for name in sorted(a):
        (da, ha), (db, hb) = a[name], b[name]
        if da.shape != db.shape:
            problems.append(f"{name}: shapes {da.shape} vs {db.shape}")
            continue
        keys = [f for f in COUNTERS if f in ha.dtype.names]
        ka = [tuple(int(ha[f][i]) for f in keys) for i in range(len(ha))]
        kb = [tuple(int(hb[f][i]) for f in keys) for i in range(len(hb))]
        if sorted(ka) != sorted(kb) or len(set(kb)) != len(kb):
            problems.append(f"{name}: images by {keys}: {sorted(ka)} vs {sorted(kb)}")
            continue
        oa, ob = np.argsort([str(k) for k in ka]), np.argsort([str(k) for k in kb])
        da, ha, db, hb = da[oa], ha[oa], db[ob], hb[ob]
        rel = float(np.abs(da - db).max() / max(np.abs(db).max(), 1e-30))
        diff = [f for f in ha.dtype.names if f not in ignore and not np.array_equal(ha[f], hb[f])]
        print(f"compare {Path(a_path).name}:{name} with {Path(b_path).name}: {da.shape[0]} images, "
              f"max |A-B| / max |B| = {rel:.2e} (tolerance {tol:g}); header fields that differ: {diff or 'none'}"
              + (f" (not compared: {', '.join(skip)})" if skip else ""))
        if not rel <= tol:
            problems.append(f"{name}: images differ by {rel:.2e} > {tol:g}")
        if diff:
            problems.append(f"{name}: header fields differ: {diff}")
    return problems


def downsample(src: str, dst: str, factor: int) -> None:
    import numpy as np

    a = np.load(src).astype(np.float32)
    h, w = (a.shape[0] // factor) * factor, (a.shape[1] // factor) * factor
    b = a[:h, :w].reshape(h // factor, factor, w // factor, factor).mean(axis=(1, 3))
    np.save(dst, b / b.max())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("layers")
    s.add_argument("image")
    s = sub.add_parser("compare")
    s.add_argument("a")
    s.add_argument("a_group")
    s.add_argument("b")
    s.add_argument("b_group")
    s.add_argument("--tol", type=float, default=1e-4)
    s.add_argument("--skip", action="append", default=[], metavar="FIELD",
                   help="a header field not to compare (e.g. image_index: each distributed worker numbers its own)")
    s = sub.add_parser("downsample")
    s.add_argument("src")
    s.add_argument("dst")
    s.add_argument("factor", type=int)
    args = p.parse_args(argv)
    if args.cmd == "layers":
        problems = check_layers(args.image)
    elif args.cmd == "compare":
        problems = compare(args.a, args.a_group, args.b, args.b_group, args.tol, tuple(args.skip))
    else:
        downsample(args.src, args.dst, args.factor)
        problems = []
    for line in problems:
        print(f"FAIL: {line}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
