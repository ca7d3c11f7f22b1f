"""genai_config.json and tokenizer_config.json: an export as an ONNX Runtime GenAI model directory.

The exporter writes them from the model's config (exporters/genai.py); every runtime checks them
against manifest.json before trusting them (check_genai_files). GenAI drives the graph as its
decoder-only "llama" type: input_ids (with attention_mask and position_ids in exports that have them, for
padded batches) and a separate past_key_%d / past_value_%d per layer in,
logits and present_key_%d / present_value_%d out, [batch, heads, positions, d_head] (docs/ops.md).

The op library is named, never located: "custom_ops_library" is the bare file name, which GenAI
looks up in the model directory, then the working directory, then the platform's library search
(an already loaded library of that soname, LD_LIBRARY_PATH, an Android app's jniLibs). An app may
override it at load (og.Config.overlay; docs/embedding.md), e.g. "@rpath/…" on iOS.

End of text: bmoe's tokenizers have no trained end-of-text token, and GenAI needs one inside the
vocabulary, so the NUL byte's token stands for it: it never occurs in text, so stopping at it never
cuts a text short, and a corpus may use it as a document separator.
"""

from __future__ import annotations

import json
from pathlib import Path

from bmoe_runtime.errors import BmoeError
from bmoe_runtime.format.manifest import read_verified
from bmoe_runtime.format.untrusted import parse_json

GENAI_CONFIG, TOKENIZER_CONFIG = "genai_config.json", "tokenizer_config.json"
OPS_LIBRARY = "libbmoe_ops.so"  # the soname of custom_ops/'s library (backends/ort_ops.LIB_NAME)
END_OF_TEXT = "\0"
PADDING_INPUTS = ("attention_mask", "position_ids")  # GenAI's names; exports before them have neither
MAX_CONFIG_BYTES = 1 << 20


def end_of_text_id(tokenizer) -> int:
    """The token of the NUL byte (see the module docstring)."""
    ids = tokenizer.encode(END_OF_TEXT)
    if len(ids) != 1:
        raise BmoeError(f"the tokenizer has no single token for the NUL byte (encodes it as {ids[:4]})")
    return ids[0]


def genai_config(cfg: dict, eos_id: int, model_file: str = "model.onnx", ops_library: str = OPS_LIBRARY,
                 inputs: list[str] = ()) -> dict:
    """The GenAI config of a bmoe LM export with manifest config `cfg` and graph inputs `inputs` (the
    padding inputs attention_mask and position_ids are named where the graph has them)."""
    padding = {name: name for name in PADDING_INPUTS if name in inputs}
    return {
        "model": {
            "type": "llama",  # decoder-only with per-layer past_key/past_value ("gpt2" wants them combined)
            "context_length": cfg["max_seq"],
            "vocab_size": cfg["vocab_size"],
            "bos_token_id": eos_id, "eos_token_id": eos_id, "pad_token_id": eos_id,
            "decoder": {
                "filename": model_file,
                "session_options": {"log_id": "bmoe", "custom_ops_library": ops_library, "provider_options": []},
                "head_size": cfg["d_model"] // cfg["n_heads"],
                "hidden_size": cfg["d_model"],
                "num_attention_heads": cfg["n_heads"],
                "num_key_value_heads": cfg["n_heads"],
                "num_hidden_layers": cfg["n_layers"],
                "inputs": {"input_ids": "input_ids", **padding, "past_key_names": "past_key_%d",
                           "past_value_names": "past_value_%d"},
                "outputs": {"logits": "logits", "present_key_names": "present_key_%d",
                            "present_value_names": "present_value_%d"},
            },
        },
        "search": {  # greedy by default; an app sets sampling per request (set_search_options)
            "do_sample": False, "max_length": cfg["max_seq"], "min_length": 0, "num_beams": 1,
            "num_return_sequences": 1, "past_present_share_buffer": False, "temperature": 1.0, "top_k": 0,
            "top_p": 1.0, "repetition_penalty": 1.0,
        },
    }


def tokenizer_config(cfg: dict) -> dict:
    """What GenAI's (and HF's) tokenizer loader reads beside tokenizer.json: no special tokens added or
    removed, no space clean-up, so decode(encode(text)) is text."""
    return {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg["max_seq"],
            "bos_token": None, "eos_token": None, "add_bos_token": False, "add_eos_token": False,
            "clean_up_tokenization_spaces": False}


def has_genai_files(manifest: dict) -> bool:
    return GENAI_CONFIG in manifest["files"]


def check_genai_files(model_dir: str | Path, manifest: dict, eos_id: int) -> dict:
    """genai_config.json and tokenizer_config.json, sha256-checked, matching the manifest's model (keys
    bmoe did not write are allowed): returns the GenAI config, or raises one BmoeError naming the first
    mismatch."""
    for name in (GENAI_CONFIG, TOKENIZER_CONFIG):
        if name not in manifest["files"]:
            raise BmoeError(f"{model_dir}: no {name} in the export (manifest.json does not list it); "
                            "re-export the model with this bmoe to run it through ONNX Runtime GenAI")
    configs = {name: parse_json(read_verified(model_dir, manifest, name, MAX_CONFIG_BYTES), f"{model_dir}: {name}")
               for name in (GENAI_CONFIG, TOKENIZER_CONFIG)}
    got = configs[GENAI_CONFIG]
    want = genai_config(manifest["config"], eos_id, manifest["model"], inputs=manifest.get("inputs", ()))
    del want["model"]["decoder"]["session_options"]  # where the library is found is the app's business
    problem = _first_difference(want["model"], got.get("model") if isinstance(got, dict) else None, "model")
    if problem is None:
        search = got.get("search", {})
        length = search.get("max_length", 0) if isinstance(search, dict) else None
        if not isinstance(length, int) or isinstance(length, bool) or not 0 <= length <= manifest["config"]["max_seq"]:
            problem = f"search.max_length is {str(length)[:40]}, more than the model's max_seq " \
                      f"{manifest['config']['max_seq']} (or not a count)"
    if problem:
        raise BmoeError(f"{model_dir}: {GENAI_CONFIG} does not match manifest.json: {problem}")
    problem = _first_difference(tokenizer_config(manifest["config"]), configs[TOKENIZER_CONFIG], "tokenizer_config")
    if problem:
        raise BmoeError(f"{model_dir}: {TOKENIZER_CONFIG} is not the one bmoe wrote: {problem}")
    return got


def _first_difference(want, got, at: str) -> str | None:
    """The first path where `got` lacks or differs from `want` (extra keys in `got` are allowed)."""
    if isinstance(want, dict):
        if not isinstance(got, dict):
            return f"{at} is missing or not an object"
        for key, value in want.items():
            problem = _first_difference(value, got.get(key), f"{at}.{key}")
            if problem:
                return problem
        return None
    if got != want or type(got) is not type(want):
        return f"{at} is {json.dumps(got)[:60]}, expected {json.dumps(want)}"
    return None
