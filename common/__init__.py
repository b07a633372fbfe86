"""What every layer shares and nothing else: the error types and the environment variables.

The bottom of the house: imports nothing of pagedgen (see docs/ARCHITECTURE.md).
"""
