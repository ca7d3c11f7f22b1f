"""The ONNX Runtime GenAI files of an LM export (format/genai_config.py): genai_config.json, and the
tokenizer as a Hugging Face tokenizer.json + tokenizer_config.json, which GenAI's tokenizer, HF's
loaders and bmoe's runtime all read."""

from __future__ import annotations

import json

from bmoe_runtime.format.genai_config import (GENAI_CONFIG, OPS_LIBRARY, TOKENIZER_CONFIG, end_of_text_id,
                                              genai_config, tokenizer_config)
from bmoe_runtime.format.tokenizer import Tokenizer, hf_tokenizer

TOKENIZER_FILE = "tokenizer.json"


def genai_files(cfg: dict, tokenizer: Tokenizer, model_file: str = "model.onnx", ops_library: str = OPS_LIBRARY,
                inputs: list[str] = ()) -> dict[str, str]:
    """File name → text for the export directory. cfg: the model's config (ModelConfig.to_dict());
    inputs: the graph's input names."""
    hf_json = tokenizer.hf_json()
    exported = hf_tokenizer(hf_json)  # what every runtime will read back: it must tokenize as training did
    probe = "ROMEO: héllo\n\tworld 日本 \0"
    if exported.encode(probe) != tokenizer.encode(probe) or exported.vocab_size != cfg["vocab_size"]:
        raise ValueError(f"the tokenizer's Hugging Face form does not match it (vocabulary {exported.vocab_size}, "
                         f"model {cfg['vocab_size']})")
    config = genai_config(cfg, end_of_text_id(exported), model_file, ops_library, inputs)
    return {TOKENIZER_FILE: hf_json, TOKENIZER_CONFIG: json.dumps(tokenizer_config(cfg), indent=1),
            GENAI_CONFIG: json.dumps(config, indent=1)}
