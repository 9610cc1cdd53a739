"""The HTTP doors: Triton's KServe v2 REST and generate extension, and the OpenAI API, served
by one aiohttp server in the gRPC server's event loop, on the same repository and engines."""
