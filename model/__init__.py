"""The model description every layer shares: ``ModelConfig`` and the weight readers.

Imports only ``common``; ``scheduler``, ``backends`` and ``engine`` build on it
(see docs/ARCHITECTURE.md).
"""
