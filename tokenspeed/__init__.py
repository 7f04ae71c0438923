"""TokenSpeed: the reference engine (execution plane), the scheduler binding and the CLI.

The kernel contract lives in ``tokenspeed_core``; this package builds on it, never the reverse.
"""

__version__ = "0.1.0"
