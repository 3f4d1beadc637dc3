"""Serving Jamba: the continuous-batching engine over a slot-indexed hybrid cache (`serving.engine`) and
the OpenAI-compatible HTTP server on top of it (`serving.server`)."""

from serving.engine import Engine, EngineConfig, EngineConfigError, QueueFullError, compilations
from serving.request import Output, Request
from serving.sampling import RequestError, SamplingParams

__all__ = ["Engine", "EngineConfig", "EngineConfigError", "Output", "QueueFullError", "Request", "RequestError",
           "SamplingParams", "compilations"]
