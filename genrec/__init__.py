"""genrec: generative recommenders (HSTU) on TorchRec, streamed by Ray."""

__version__ = "0.1.0"
