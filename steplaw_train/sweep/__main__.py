"""`python -m steplaw_train.sweep +grid=NAME [launcher=...] [dry_run=true] ...`."""

from steplaw_train.sweep.full import main

if __name__ == "__main__":
    main()
