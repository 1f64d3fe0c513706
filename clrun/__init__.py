"""clrun: a continual-learning experiment runner. ``clrun --help`` lists the config groups."""

__version__ = "0.1.0"
