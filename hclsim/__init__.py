"""hclsim: simulate the OpenHCL paravisor environment (VTL2) on an ordinary Linux machine."""

__version__ = "0.1.0"


class HclsimError(Exception):
    """An error the user caused or can act on; the CLI prints it as one line and exits non-zero."""
