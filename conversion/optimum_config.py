"""optimum's OnnxConfig for our model type. Imported only where optimum is installed (the optimum world)."""

from optimum.exporters.onnx.config import TextEncoderOnnxConfig
from optimum.utils import NormalizedTextConfig

AXES = {0: "batch_size", 1: "sequence_length"}


class NomicMoEOnnxConfig(TextEncoderOnnxConfig):
    NORMALIZED_CONFIG_CLASS = NormalizedTextConfig
    DEFAULT_ONNX_OPSET = 17
    ATOL_FOR_VALIDATION = 1e-4

    @property
    def inputs(self):
        return {"input_ids": dict(AXES), "attention_mask": dict(AXES)}

    @property
    def outputs(self):
        # the second output needs model_kwargs={"return_sentence_embedding": True} in main_export
        return {"last_hidden_state": dict(AXES), "sentence_embedding": {0: "batch_size"}}


def nomic_moe_onnx_config(config, task: str = "feature-extraction"):
    return NomicMoEOnnxConfig(config, task=task)
