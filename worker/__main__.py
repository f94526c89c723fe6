"""``python -m worker`` is ``devserver-reaper``."""

from worker.cli import main

if __name__ == "__main__":
    main()
