"""Triton-style model repository: configs, versions, engine settings and model lifecycle."""

from pagedserve.repository.manager import ModelRepository, ModelVersion, RepositoryError

__all__ = ["ModelRepository", "ModelVersion", "RepositoryError"]
