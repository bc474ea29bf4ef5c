"""comi_hf: COMI (coarse-to-fine context compression with marginal information gain) for transformers."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_comi import COMIConfig
from .errors_comi import (
    COMIError,
    ContextTooLongError,
    DecoderError,
    DecoderRefusedError,
    DecoderUnavailableError,
    InvalidInputError,
    MalformedDataError,
    ModelLoadError,
    ModelNotFoundError,
    NonFiniteError,
    UnauthorizedError,
    UnsupportedSettingError,
    UsageError,
)
from .mig import MIGDetails, mig_compress
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

# DEFAULT_MODEL, the tiny trained model shipped in the package (a directory like any Hub checkpoint),
# and DEFAULT_BACKBONE, the plain causal LM it was built from: see pipeline_comi.py.
from .pipeline_comi import DEFAULT_BACKBONE, DEFAULT_MODEL, PIPELINE_TASK, COMIQuestionAnsweringPipeline

__version__ = "0.1.0"
# With the package imported, COMI directories load through the Auto classes without remote code.
AutoConfig.register(COMIConfig.model_type, COMIConfig, exist_ok=True)
AutoModel.register(COMIConfig, COMIForConditionalGeneration, exist_ok=True)
AutoModelForCausalLM.register(COMIConfig, COMIForConditionalGeneration, exist_ok=True)

__all__ = [
    "DEFAULT_BACKBONE",
    "DEFAULT_MODEL",
    "MIG_OPTIONS",
    "PIPELINE_TASK",
    "COMIError",
    "COMICompressionDetails",
    "COMICompressionModel",
    "COMIConfig",
    "COMIContextEncoding",
    "COMIForConditionalGeneration",
    "COMIOutput",
    "COMIPreTrainedModel",
    "COMIPromptEncoder",
    "COMIQuestionAnsweringPipeline",
    "ContextTooLongError",
    "DecoderError",
    "DecoderRefusedError",
    "DecoderUnavailableError",
    "InvalidInputError",
    "MIGDetails",
    "MalformedDataError",
    "ModelLoadError",
    "ModelNotFoundError",
    "NonFiniteError",
    "UnauthorizedError",
    "UnsupportedSettingError",
    "UsageError",
    "mig_compress",
    "official_generation_config",
]
