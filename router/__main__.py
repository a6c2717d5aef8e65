"""`python -m router` is the `cascade` command."""

from router.cli import main

raise SystemExit(main())
