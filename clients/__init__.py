"""Clients of the Triton gRPC protocol (see README.md); importable as ``clients.*``."""
