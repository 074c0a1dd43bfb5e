"""partmatch: recognise automotive parts from photos with deep metric learning."""

__version__ = "0.1.0"
