"""The one command line: ``scoremri {simulate,replay,serve,fix-header,train,export}``.

Each subcommand lives in its wing's module exposing ``add_arguments(parser)`` and ``run(args) -> int``; only the
chosen one is imported, so ``scoremri --help`` stays fast. This module owns what every subcommand shares
(ARCHITECTURE.md, "The command line"):

- exit codes: 0 done; 1 the data could not be used (a missing or malformed file, a scan that cannot be
  reconstructed, a port already in use); 2 the command line is wrong (an option or its value, an unknown
  preset, a bad ``--set``); 130 interrupted (Ctrl-C); 143 terminated (SIGTERM);
- every user error is ONE line on stderr, ``scoremri <command>: error: <message>``, naming the offending
  value; the traceback of an unexpected failure goes to the DEBUG log only;
- the runtime settings of the commands that reconstruct (replay, serve): ``--threads`` and ``--slice-batch``
  (:func:`add_runtime_arguments`; never part of a preset);
- Ctrl-C and SIGTERM end with one line saying what was kept (a subcommand reports it through :func:`keep`);
  what a subcommand already wrote stays written (replay writes each image as it is done).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import signal
import sys
import threading
from typing import Any, Iterator, NoReturn

log = logging.getLogger("scoremri")

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "simulate": ("scoremri.gadget.files.simulate", "magnitude image -> simulated multi-coil ISMRMRD raw .h5"),
    "replay": ("scoremri.gadget.files.replay", "reconstruct an ISMRMRD raw .h5 offline (same core as the gadget)"),
    "serve": ("scoremri.gadget.server", "long-lived server with a warm model (Gadgetron <connect> mode or the MRD protocol)"),
    "fix-header": ("scoremri.gadget.files.fixheader",
                   "drop the header <version> Gadgetron 4.7 refuses (e.g. 8 from ISMRMRD 1.8 tools)"),
    "train": ("scoremri.model.train", "train a score prior on magnitude images"),
    "export": ("scoremri.model.export", "export a score network checkpoint to ONNX"),
}
EXIT_DATA = 1
EXIT_USAGE = 2
EXIT_SIGINT = 130
EXIT_SIGTERM = 143


class UsageError(ValueError):
    """The command line is wrong (exit 2); the message names the option and the offending value."""


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived (raised from the signal handler so that ``finally`` blocks and file closes run)."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``prog: error: message (see 'prog --help')``, exit 2."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message} (see '{self.prog} --help')\n")
        sys.exit(EXIT_USAGE)


_kept: list[str] = []


def keep(text: str) -> None:
    """What the running subcommand has safely written so far (said on Ctrl-C / SIGTERM / error). A layer below
    the CLI that cannot import it raises ``KeyboardInterrupt(text)`` instead."""
    _kept[:] = [text]


@contextlib.contextmanager
def uninterrupted() -> Iterator[None]:
    """Hold SIGINT / SIGTERM until the block is done (writing one image), then raise them: files stay whole."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    old = {s: signal.signal(s, lambda signum, frame: pending.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        if signal.SIGTERM in pending:
            raise Terminated()
        if pending:
            raise KeyboardInterrupt()


def add_runtime_arguments(p: argparse.ArgumentParser) -> None:
    """``--threads`` and ``--slice-batch``: runtime settings shared by serve and replay (never in a preset)."""
    from .threads import parse_threads

    def threads_arg(text: str) -> int | None:
        try:
            return parse_threads(text, "--threads")
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    def batch_arg(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            n = -1
        if n < 0:
            raise argparse.ArgumentTypeError(f"--slice-batch {text!r} is not an integer >= 0")
        return n

    p.add_argument("--threads", type=threads_arg, default=None, metavar="N",
                   help="CPU threads for the reconstruction (default auto: the CPUs this process may use by "
                        "affinity and cgroup quota, shared among concurrent scans, at most the idle ones; "
                        "OMP_NUM_THREADS when set). On a shared host give your share, e.g. --threads 1")
    p.add_argument("--slice-batch", type=batch_arg, default=None, metavar="N",
                   help="most slices per sampler run when several are ready (default 0 = auto: 16 on CUDA, 1 on "
                        "CPU where batches are no faster per slice; 1 = one by one)")


def version() -> str:
    from scoremri.gadget.images import scoremri_version

    return scoremri_version()


def _top_parser() -> argparse.ArgumentParser:
    top = _Parser(
        prog="scoremri",
        description="Score-based diffusion MRI reconstruction (Chung & Ye 2022) for Gadgetron and MRD scanners.",
        epilog="commands:\n" + "\n".join(f"  {k:<10}{v[1]}" for k, v in SUBCOMMANDS.items())
        + "\n\n'scoremri COMMAND --help' describes each. Exit codes: 0 done, 1 unusable data, 2 bad command "
          "line,\n130 interrupted, 143 terminated.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    top.add_argument("command", choices=list(SUBCOMMANDS), metavar="COMMAND", help="what to do (below)")
    top.add_argument("--version", action="version", version=f"scoremri {version()}")
    return top


def _sigterm(signum: int, frame: Any) -> None:
    raise Terminated()


def _fail(prog: str, message: str, code: int) -> int:
    kept = f" ({_kept[0]} kept)" if _kept else ""
    sys.stderr.write(f"{prog}: error: {message}{kept}\n")
    return code


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "--version") or argv[0].startswith("-"):
        top = _top_parser()
        top.parse_args(argv or ["--help"])  # prints help/version and exits, or a one-line error
        return EXIT_USAGE
    name = argv[0]
    if name not in SUBCOMMANDS:
        _top_parser().error(f"unknown command '{name}' (choose from {', '.join(SUBCOMMANDS)})")
    prog = f"scoremri {name}"
    module = importlib.import_module(SUBCOMMANDS[name][0])
    parser = _Parser(prog=prog, description=SUBCOMMANDS[name][1])
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                        type=str.upper, help="logging threshold (default INFO)")
    parser.add_argument("--version", action="version", version=f"scoremri {version()}")
    module.add_arguments(parser)
    args = parser.parse_args(argv[1:])
    logging.basicConfig(level=getattr(logging, args.log_level), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _kept.clear()
    from scoremri.recon.config import ConfigError

    usage_errors = (UsageError, ConfigError) + tuple(getattr(module, "USAGE_ERRORS", ()))
    data_errors = tuple(getattr(module, "DATA_ERRORS", ())) + (OSError,)
    previous = signal.signal(signal.SIGTERM, _sigterm)
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt as e:  # the exception may say what was kept (model/train.py does)
        if e.args:
            keep(str(e.args[0]))
        if isinstance(e, Terminated):
            return _fail(prog, "terminated by SIGTERM", EXIT_SIGTERM)
        return _fail(prog, "interrupted (Ctrl-C)", EXIT_SIGINT)
    except usage_errors as e:
        return _fail(prog, str(e), EXIT_USAGE)
    except data_errors as e:
        return _fail(prog, _oserror_text(e) if isinstance(e, OSError) else str(e), EXIT_DATA)
    except Exception as e:  # a bug: one line for the user, the traceback in the DEBUG log
        log.debug("unexpected failure", exc_info=True)
        return _fail(prog, f"unexpected {type(e).__name__}: {e} (run with --log-level DEBUG for the traceback)",
                     EXIT_DATA)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _oserror_text(e: OSError) -> str:
    """'path: reason' for file errors (``[Errno 2] No such file ...`` is not a sentence)."""
    if e.filename is not None:
        return f"{e.filename}: {e.strerror or e}"
    return e.strerror or str(e)


if __name__ == "__main__":  # python -m scoremri.gadget.cli: run the imported module, not a second copy of it
    from scoremri.gadget.cli import main as _main

    sys.exit(_main())
