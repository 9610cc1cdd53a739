"""The engine as a Triton Inference Server Python-backend model (``TritonPythonModel``).

Real ``tritonserver`` loads it as the Python-based backend ``pagedserve``: a backend folder
``<backend-directory>/pagedserve/model.py`` that imports ``TritonPythonModel`` from here, beside
Triton's own ``python`` backend (docs/triton.md). Requests and responses are mapped by
``pagedserve.tensors``, the module our own server uses, so both give the same outputs.
"""
