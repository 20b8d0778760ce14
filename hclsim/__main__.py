"""`python -m hclsim`: the hclsim command (hclsim.cli). Ctrl-C is one line and exit 130 from
the very start, the imports included."""
import os
import signal
import sys


def _interrupted(signum, frame):
    try:
        os.write(2, b"hclsim: interrupted\n")
    finally:
        os._exit(130)


signal.signal(signal.SIGINT, _interrupted)
from hclsim.cli import main  # noqa: E402  (after the handler, so an early Ctrl-C is handled too)

sys.exit(main())
