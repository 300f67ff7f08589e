"""hiddenpool's command line: ``main`` parses and dispatches (``cli.main``); each command
lives in a module of its own (``compare``, ``encode`` with ``encode_options`` and
``encode_ray``, ``export``, ``bench``, ``serve``), and the checks they share in
``checks``. Commands turn their parsed arguments into typed options once, at the top;
nothing below the CLI sees argparse."""

from hiddenpool.cli.main import main

__all__ = ["main"]
