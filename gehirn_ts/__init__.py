"""gehirn-ts: a programmable mail and event delivery daemon."""

__version__ = "0.1.0"
