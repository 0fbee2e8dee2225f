"""`python -m service` is the `filedock` command."""

from service.cli import main

if __name__ == "__main__":  # not when a worker process imports this as the main module
    raise SystemExit(main())
