"""comi_hf: COMI (coarse-to-fine context compression with marginal information gain) for transformers."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_comi import COMIConfig
from .mig import MIGDetails, NonFiniteInputError, mig_compress
from .modeling_comi import (
    MIG_OPTIONS,
    COMICompressionDetails,
    COMICompressionModel,
    COMIContextEncoding,
    COMIForConditionalGeneration,
    COMIOutput,
    COMIPreTrainedModel,
    COMIPromptEncoder,
    official_generation_config,
)

# DEFAULT_MODEL: the tiny trained model shipped in the package (see its README.md); a directory
# like any Hub checkpoint, used by `comi-qa` and `pipeline("comi-qa")` when no model is given.
from .pipeline_comi import DEFAULT_MODEL, PIPELINE_TASK, COMIQuestionAnsweringPipeline

__version__ = "0.1.0"
# With the package imported, COMI directories load through the Auto classes without remote code.
AutoConfig.register(COMIConfig.model_type, COMIConfig, exist_ok=True)
AutoModel.register(COMIConfig, COMIForConditionalGeneration, exist_ok=True)
AutoModelForCausalLM.register(COMIConfig, COMIForConditionalGeneration, exist_ok=True)

__all__ = [
    "DEFAULT_MODEL",
    "MIG_OPTIONS",
    "PIPELINE_TASK",
    "COMICompressionDetails",
    "COMICompressionModel",
    "COMIConfig",
    "COMIContextEncoding",
    "COMIForConditionalGeneration",
    "COMIOutput",
    "COMIPreTrainedModel",
    "COMIPromptEncoder",
    "COMIQuestionAnsweringPipeline",
    "MIGDetails",
    "NonFiniteInputError",
    "mig_compress",
    "official_generation_config",
]
