"""``python -m v2p`` and the ``v2p`` console script: the command's entry point.

The signal handlers go in before anything heavy is imported: the library takes
most of a second to import on a busy machine, and a Ctrl-C or SIGTERM in that
time must end like one later on (one line, exit 128+signal), not in a traceback
or a silent death.
"""

import sys

from . import interrupts


def run() -> int:
    interrupts.install()
    try:
        from .cli import main

        return main()
    except KeyboardInterrupt:  # while importing, or before the command's own handling began
        try:
            print(interrupts.STOPPED, file=sys.stderr)
        except OSError:  # nobody is listening on stderr
            pass
        return interrupts.exit_status()


if __name__ == "__main__":
    sys.exit(run())
