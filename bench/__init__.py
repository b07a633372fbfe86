"""Benchmarks: the offline engine against Hugging Face transformers, and (later) a running server."""
