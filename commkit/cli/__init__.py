"""``python -m commkit``: one module per command (``register`` builds its parser, ``run`` runs it).

Building a parser loads no torch (``python -m commkit bench --help`` answers at once, see
``tests/test_cli_ux.py``): a command module imports the tools, torch and CuPy inside ``run`` and its
helpers, not at its top. ``demo`` and ``train`` are the exceptions (their configs are torch code).
"""
