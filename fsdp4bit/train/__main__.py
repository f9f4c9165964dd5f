"""``python -m fsdp4bit.train``: see :mod:`fsdp4bit.train.cli`."""

from .cli import main

raise SystemExit(main())
