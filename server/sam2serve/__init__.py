"""sam2serve: SAM 2 automatic mask generation as a service. This package never imports torch."""

__version__ = "0.1.0"
