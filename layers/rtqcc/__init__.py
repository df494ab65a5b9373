"""RTQCC: durable, observable long-document generation jobs.

The shared library used by the API function, the consumer function and the local emulator.
"""

__version__ = "0.1.0"
