"""Label-free box embeddings for the cold start: the pool autoencoder, its cache and its background job."""

from .autoencoder import AutoencoderSettings
from .store import EmbeddingSet, EmbeddingStage, embedding_job, pool_embeddings

__all__ = ["AutoencoderSettings", "EmbeddingSet", "EmbeddingStage", "embedding_job", "pool_embeddings"]
