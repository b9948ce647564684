"""One module per ``model-loader`` subcommand. Each exposes ``NAME``, ``add_parser(subparsers, settings)`` and
``run(args, settings, log) -> int``; ``loader.cli`` lists them in ``COMMANDS`` and imports only the one that
runs, so a warm ``pull`` does not pay for the others' imports."""
