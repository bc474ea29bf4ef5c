"""Serving COMI at scale: the compressor in this process, the decoder on vLLM.

* `COMIServingClient` (`client.py`): answers questions; compresses here, decodes on a vLLM
  server (`VLLMServerDecoder`) or an in-process `vllm.LLM` (`VLLMEngineDecoder`).
* `comi-serve` (`server.py`): the HTTP service around it.
* `comi-export-decoder` (`export.py`): the decoder as a directory vLLM loads.
* `vllm_sampling` (`sampling.py`): `generate`'s settings as vLLM's, or a clear refusal.
* `EncodedContextCache` (`cache.py`): encoded documents kept for the next question.

See docs/serving.md.
"""

from .cache import EncodedContextCache
from .client import COMIServingClient, Question
from .decoder import Completion, VLLMEngineDecoder, VLLMReplicas, VLLMServerDecoder
from .sampling import VLLMSampling, vllm_sampling

__all__ = [
    "COMIServingClient",
    "Completion",
    "EncodedContextCache",
    "Question",
    "VLLMEngineDecoder",
    "VLLMReplicas",
    "VLLMSampling",
    "VLLMServerDecoder",
    "vllm_sampling",
]
