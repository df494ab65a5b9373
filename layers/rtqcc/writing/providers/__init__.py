"""Providers stream text for a prompt and honour an abort signal."""

from .base import GenerationRequest, GenerationResult, Provider

__all__ = ["GenerationRequest", "GenerationResult", "Provider"]
