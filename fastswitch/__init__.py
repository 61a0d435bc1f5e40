"""FastSwitch: an LLM serving engine that keeps many users fair by preempting every iteration."""

from fastswitch.config import EngineConfig
from fastswitch.engine.engine import Engine
from fastswitch.engine.outputs import RequestOutput
from fastswitch.llm import LLM
from fastswitch.sampling import SamplingParams

__all__ = ["LLM", "Engine", "EngineConfig", "RequestOutput", "SamplingParams"]
__version__ = "0.1.0"
