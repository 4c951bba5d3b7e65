"""m3cli: budgeted visual question answering with Matryoshka Multimodal Models."""

__version__ = "0.1.0"
