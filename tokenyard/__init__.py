"""tokenyard: an LLM serving system that schedules requests at every level."""

from tokenyard.config import EngineConfig
from tokenyard.engine.llm_engine import LLMEngine
from tokenyard.entrypoints.llm import LLM
from tokenyard.outputs import RequestOutput
from tokenyard.sampling_params import InvalidParameterError, SamplingParams

__all__ = ["LLM", "EngineConfig", "InvalidParameterError", "LLMEngine", "RequestOutput", "SamplingParams"]
__version__ = "0.1.0"
