"""peftbench: compare parameter-efficient fine-tuning methods side by side."""

__version__ = "0.1.0"
