"""`python -m service` is the `filedock` command."""

if __name__ == "__main__":  # not when the archive worker process loads this module
    from service.face.cli import main

    raise SystemExit(main())
