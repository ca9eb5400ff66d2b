"""bluegreen: zero-downtime blue/green deploys of one Docker container behind nginx."""

__version__ = "0.1.0"
