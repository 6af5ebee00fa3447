"""Hand-written GPU kernels (Triton); each module imports cleanly without Triton installed."""
