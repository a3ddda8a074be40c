"""crosschip: train on one chip, serve on another, and prove the model survived the trip."""

__version__ = "0.1.0"
