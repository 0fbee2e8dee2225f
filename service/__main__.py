"""`python -m service` is the `filedock` command."""

from service.cli import main

raise SystemExit(main())
