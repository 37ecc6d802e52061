"""Embedders that turn image bytes into CLIP embeddings, and the factory that picks one by config."""

from embed_service.backends.base import Embedder, ModelInfo
from embed_service.backends.hash_embedder import HashEmbedder
from embed_service.backends.inference_embedder import InferenceEmbedder
from embed_service.backends.onnx_embedder import OnnxEmbedder
from embed_service.config import EmbedConfig

__all__ = ["Embedder", "HashEmbedder", "InferenceEmbedder", "ModelInfo", "OnnxEmbedder", "create_embedder"]


def create_embedder(config: EmbedConfig) -> Embedder:
    """Create the embedder that config.backend names; nothing is loaded or contacted yet."""
    if config.backend == "onnx":
        return OnnxEmbedder(config.model_dir, config.onnx_threads, config.max_image_pixels)
    if config.backend == "inference":
        return InferenceEmbedder(
            url=config.inference_url,
            api_key=config.inference_api_key,
            clip_version_id=config.clip_version_id,
            timeout_s=config.inference_timeout_s,
            concurrency=config.inference_concurrency,
            retries=config.inference_retries,
            backoff_s=config.inference_backoff_s,
        )
    if config.backend == "hash":
        return HashEmbedder(config.max_image_pixels)
    raise ValueError(f"unknown backend {config.backend!r}")
