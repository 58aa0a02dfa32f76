"""Pictures for people: ``sslkit viz attention`` (DINO) and ``sslkit viz reconstruct`` (MAE).

Each sub-module exposes ``add_arguments(parser)`` and ``run(args) -> int`` for the CLI.
"""
