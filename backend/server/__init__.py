"""The Triton-compatible gRPC server (KServe v2 ``inference.GRPCInferenceService``)."""
