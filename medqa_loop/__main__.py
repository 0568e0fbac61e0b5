"""``python -m medqa_loop ...`` is the ``medqa`` command."""

from medqa_loop.cli import main

main()
