"""``model-loader``: the command line. Reads settings once, parses flags, runs one subcommand
(``loader/commands/<name>.py``), and maps errors to exit codes (loader.contract.ExitCode) with one clear message."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from types import ModuleType
from typing import NoReturn

from loader import contract
from loader.config import LoaderSettings, SettingsError
from loader.errors import LoaderError
from loader.log import Logger

# Subcommand -> module under loader/commands, in the order `--help` lists them.
COMMANDS = {"pull": "pull", "push": "push", "prefetch": "prefetch", "gc": "gc", "ls": "ls", "export": "export",
            "import": "import_bundle", "csi": "csi", "agent": "agent", "sign": "sign"}


def _modules(argv: list[str]) -> list[ModuleType]:
    # Import only the subcommand being run (start-up time matters for a warm pull); all of them for --help.
    wanted = [m for c, m in COMMANDS.items() if c in argv[:1]] or list(COMMANDS.values())
    return [importlib.import_module(f"loader.commands.{m}") for m in wanted]


def build_parser(settings: LoaderSettings, modules: list[ModuleType]) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=contract.PROGRAM,
                                description="Pull, package and manage OCI model artifacts in a shared cache.")
    sub = p.add_subparsers(dest="command", required=True)
    for m in modules:
        m.add_parser(sub, settings)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        settings = LoaderSettings.from_env()
    except SettingsError as exc:
        print(f"model-loader: invalid setting: {exc}", file=sys.stderr)
        return contract.ExitCode.USAGE
    log = Logger(level=settings.log_level)
    modules = _modules(argv)
    args = build_parser(settings, modules).parse_args(argv)
    command = next(m for m in modules if args.command == m.NAME)
    try:
        code: int = command.run(args, settings, log)
        return code
    except (LoaderError, PermissionError) as exc:
        # A PermissionError anywhere (the cache, a pull secret's file) is exit 9 naming uid, path and owner.
        err = exc if isinstance(exc, LoaderError) else _permission_problem(exc)
        log.error("failed", command=args.command, exit_code=int(err.exit_code), error=str(err))
        _termination_failure(settings.termination_log, err)
        return int(err.exit_code)
    except KeyboardInterrupt:
        return 130


def entry() -> NoReturn:
    """The console script: main(), then out without the interpreter's teardown. Freeing ~200 modules one by one
    took ~15 ms of a ~0.13 s cache-hit pull, on every pod start; every command has closed what it opened by the
    time it returns (files through ``with``, locks and descriptors in ``finally``), and registers nothing to run
    at exit, so the teardown had nothing left to do but free memory the kernel frees anyway."""
    try:
        code = int(main() or 0)
    except BrokenPipeError:  # the reader went away (`model-loader ls | head -1`): nothing left to say to it
        code = 128 + 13  # as a shell reports SIGPIPE
    for stream in (sys.stdout, sys.stderr):  # None when the process started with it closed
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):  # a reader that went away, or a closed stream: the exit code still tells
            code = code or 1
    os._exit(code)


def _permission_problem(exc: PermissionError) -> LoaderError:
    from loader.cache import permission_problem  # here: only a failed run pays for the import

    return permission_problem(exc)


def _termination_failure(path: str, exc: LoaderError) -> None:
    if path and os.path.exists(path):
        try:
            with open(path, "w") as f:
                f.write(f"{type(exc).__name__}: {exc}"[:4000] + "\n")
        except OSError:
            pass


if __name__ == "__main__":
    entry()
