"""The ``dicomgw`` command: tools that read the same configuration as the daemon.

    dicomgw [--config PATH] COMMAND [ARGS...]

Each command is a function registered with :func:`command`; it receives the
parsed arguments and returns the process exit status.
"""

from __future__ import annotations

import argparse
import os
import sys

from gateway.config import DEFAULT_CONFIG_PATH, ConfigError

_COMMANDS: dict[str, tuple] = {}


def command(name: str, help: str, arguments=()):
    """Register ``f(args) -> int`` as ``dicomgw NAME``.

    ``arguments`` is a sequence of (args, kwargs) for ``add_argument``.
    """

    def register(f):
        _COMMANDS[name] = (f, help, tuple(arguments))
        return f

    return register


@command("check-config", "validate a configuration file the way the daemon would (exit 0 or 1)",
         [(("path",), {"nargs": "?", "help": "the file to check (default: --config)"})])
def check_config(args) -> int:
    from gateway.tap import load_checked_config  # what start-up runs

    path = args.path or args.config
    try:
        load_checked_config(path)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 1
    print(f"{path}: configuration is valid")
    return 0


def _config_or_exit(path):
    from gateway.tap import load_checked_config

    try:
        return load_checked_config(path)
    except ConfigError as e:
        print(e, file=sys.stderr)
        raise SystemExit(1) from None


@command("echo", "C-ECHO a configured destination: success with the round-trip time, or why it failed",
         [(("name",), {"help": "the destination's name ([[destination]] name)"})])
def echo(args) -> int:
    from gateway.cli import scu as scutool
    return scutool.echo(_config_or_exit(args.config), args.name)


@command("send", "send DICOM files (directories: every file in them) to configured destinations",
         [(("--destination", "-d"), {"action": "append", "required": True, "metavar": "NAME",
                                     "help": "a destination's name (repeat for several)"}),
          (("--retries",), {"type": int, "default": None, "metavar": "N",
                            "help": "retries of failed files (default: [scu] retries)"}),
          (("paths",), {"nargs": "+", "metavar": "FILES_OR_DIRS"})])
def send(args) -> int:
    from gateway.cli import scu as scutool
    return scutool.send(_config_or_exit(args.config), args.destination, args.paths, retries=args.retries)
@command("migrate", "bring the index and export databases to this version's schema (the daemon does it at "
         "start too; safe beside running nodes)")
def migrate(args) -> int:
    from gateway.export import store as jobs
    from gateway.store import index
    from gateway.store.database import DatabaseError, SchemaTooNew, migrate_now

    config = _config_or_exit(args.config)
    root = os.path.abspath(config.gateway.storage)
    url, schema = config.index.url, config.index.schema
    where = config.index.safe_url() if url else root
    try:
        for what, path, migrations, namespace in (
                ("index", url or os.path.join(root, index.DB_NAME), index.MIGRATIONS, schema),
                ("export jobs", url or os.path.join(root, jobs.DB_NAME), jobs.MIGRATIONS, f"{schema}_exports")):
            applied, version = migrate_now(path, migrations, namespace)
            done = f"applied {', '.join(map(str, applied))}" if applied else "nothing to apply"
            print(f"{what} ({where}): {done}; schema version {version}")
    except (OSError, RuntimeError, SchemaTooNew, *DatabaseError) as e:
        print(f"dicomgw migrate: {where}: {e}", file=sys.stderr)
        return 1
    return 0


@command("dev-certs", "create a DEVELOPMENT-ONLY CA, server and client certificate when missing",
         [(("--dir",), {"default": "etc/tls", "help": "where to write them (default: etc/tls)"})])
def dev_certs(args) -> int:
    from gateway.cli.devcerts import make_dev_certs

    try:
        written = make_dev_certs(args.dir)
    except (OSError, ValueError) as e:
        print(f"dicomgw dev-certs: {e}", file=sys.stderr)
        return 1
    if written:
        print(f"wrote development-only certificates (not for production) to {args.dir}: "
              + ", ".join(os.path.basename(p) for p in written))
    else:
        print(f"{args.dir}: development certificates already present; nothing to do")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dicomgw", description=__doc__.splitlines()[0])
    p.add_argument("--config", "-c", default=DEFAULT_CONFIG_PATH,
                   help=f"configuration file (default: {DEFAULT_CONFIG_PATH})")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (f, help_text, arguments) in sorted(_COMMANDS.items()):
        sp = sub.add_parser(name, help=help_text, description=help_text)
        for a, kw in arguments:
            sp.add_argument(*a, **kw)
        sp.set_defaults(func=f)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    return args.func(args)

