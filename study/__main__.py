"""``python -m study`` is the ``study`` command."""

from study.cli.app import main

main()
