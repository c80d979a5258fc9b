"""Entry point of the `fleetmate` command: parse arguments, load config, dispatch."""

from __future__ import annotations

import argparse
import os
import sys

import msgspec

from app import __version__, config, logs
from app.cli import config_flags
from app.cli.api import add_tls_options
from app.cli.pipes import quiet_pipe

EXIT_CONFIG = 2
CONFIG_HELP = "a TOML file over config/default.toml (default: $FLEETMATE_CONFIG)"


def _parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; the ~100 configuration flags go only on `command`'s subparser (all when None):
    building them for every subcommand cost `fleetmate shell` and the rest tens of milliseconds."""

    def wants(name: str) -> bool:
        return command is None or command == name

    parser = argparse.ArgumentParser(prog="fleetmate", description="A control plane for fleets of databases.")
    parser.add_argument("--version", action="version", version=f"fleetmate {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    # Configuration flags are exact: argparse's abbreviations (--http-p) would hide a typo.
    serve = sub.add_parser(
        "serve",
        help="run a replica in the foreground",
        usage="fleetmate serve [-h] [--config PATH] [--workers N] [--KEY VALUE ...]",
        allow_abbrev=False,
    )
    serve.add_argument("--config", metavar="PATH", help=CONFIG_HELP)
    serve.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # started by the supervisor
    serve.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    if wants("serve"):
        config_flags.add_flags(serve)  # --workers N among them

    agent = sub.add_parser(
        "agent",
        help="run the per-host agent against a control plane's NATS (nats.url)",
        usage="fleetmate agent [-h] [--config PATH] [--KEY VALUE ...]",
        allow_abbrev=False,
    )
    agent.add_argument("--config", metavar="PATH", help=CONFIG_HELP)
    if wants("agent"):
        config_flags.add_flags(agent)

    cfg = sub.add_parser("config", help="inspect the configuration")
    cfg_sub = cfg.add_subparsers(dest="config_command", required=True)
    show = cfg_sub.add_parser(
        "show",
        help="print the effective configuration, secrets masked",
        usage="fleetmate config show [-h] [--config PATH] [--json] [--KEY VALUE ...]",
        allow_abbrev=False,
    )
    show.add_argument("--config", metavar="PATH", help=CONFIG_HELP)
    show.add_argument("--json", action="store_true", help="print JSON instead of TOML")
    if wants("config"):
        config_flags.add_flags(show)
    cfg_sub.add_parser("keys", help="list every FLEETMATE_* variable, the key it sets and its flag")

    clu = sub.add_parser("cluster", help="look at the replicas")
    clu_sub = clu.add_subparsers(dest="cluster_command", required=True)
    st = clu_sub.add_parser("status", help="the leader, the replicas and the registry's revision")
    st.add_argument("--addr", metavar="URL[,URL...]", help="server addresses (default: $FLEETMATE_ADDR)")
    st.add_argument("--token", help="API token (default: $FLEETMATE_TOKEN)")
    add_tls_options(st)

    from app.cli import node as node_cli

    node_cli.add_parser(sub)
    from app.cli import ha as ha_cli

    ha_cli.add_parser(sub)
    from app.cli import sched as sched_cli

    sched_cli.add_parser(sub)
    from app.cli import kv as kv_cli

    kv_cli.add_parser(sub)
    from app.cli import audit as audit_cli

    audit_cli.add_parser(sub)
    from app.cli import restore as restore_cli

    restore_cli.add_parser(sub, CONFIG_HELP, config_flags.add_flags if wants("restore") else None)

    shell = sub.add_parser("shell", help="a zkCli-style shell on the registry's REST API")
    from app.cli.shell_args import add_arguments as add_shell_arguments

    add_shell_arguments(shell)
    return parser


def _load(path: str | None, flags: dict[str, str], *, serving: bool = False) -> config.Config:
    try:
        cfg = config.load(path, flags=flags)
        if serving:
            config.check_free_space(cfg)
        return cfg
    except config.ConfigError as exc:
        print(f"fleetmate: config error: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the process exit code."""
    words = sys.argv[1:] if argv is None else argv
    command = next((w for w in words if not w.startswith("-")), None)  # the subcommand, as argparse finds it
    args = _parser(command).parse_args(argv)
    return quiet_pipe(lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    if args.command == "config":
        if args.config_command == "keys":
            for env, key in config.env_keys().items():
                print(f"{env:<40} {key:<34} {config.flag_name(key)}")
            return 0
        data = config.to_dict(_load(args.config, config_flags.given(args)))
        if args.json:
            print(msgspec.json.format(msgspec.json.encode(data)).decode())
        else:
            print(config.to_toml(data), end="")
        return 0
    if args.command == "serve":
        flags = config_flags.given(args)
        cfg = _load(args.config, flags, serving=True)
        logs.setup(cfg.log_level, cfg.log_format, config.secrets(cfg))
        workers = cfg.workers or config.auto_workers(cfg, os.cpu_count() or 1)
        if args.worker or workers == 1:
            from app.cli.serve import run

            return run(cfg, worker=args.worker, ready_fd=args.ready_fd)
        from app.cli.supervisor import run as supervise

        # Workers get the flags as variables, under the settings the supervisor gives each of them.
        return supervise(cfg, workers, args.config, config_flags.as_env(flags))
    if args.command == "agent":
        cfg = _load(args.config, config_flags.given(args))
        logs.setup(cfg.log_level, cfg.log_format, config.secrets(cfg))
        from app.cli.agent import run as run_agent

        return run_agent(cfg)
    if args.command == "cluster":
        from app.cli.cluster import status

        return status(args)
    if args.command == "node":
        from app.cli.node import run as run_node

        return run_node(args)
    if args.command == "ha":
        from app.cli.ha import run as run_ha

        return run_ha(args)
    if args.command == "sched":
        from app.cli.sched import run as run_sched

        return run_sched(args)
    if args.command == "kv":
        from app.cli.kv import run as run_kv

        return run_kv(args)
    if args.command == "audit":
        from app.cli.audit import run as run_audit

        return run_audit(args)
    if args.command == "restore":
        cfg = _load(args.config, config_flags.given(args))
        logs.setup("warning", cfg.log_format, config.secrets(cfg))  # its own progress goes to stdout
        from app.cli.restore import run as run_restore

        return run_restore(args, cfg)
    if args.command == "shell":
        from app.cli.shell import run as run_shell

        return run_shell(args)
    return EXIT_CONFIG


if __name__ == "__main__":
    sys.exit(main())
