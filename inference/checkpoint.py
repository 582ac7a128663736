"""Load a local checkpoint directory in whichever layout its config.json names (GPT-2 or Llama)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from inference.llama import Llama, load_llama_checkpoint
from inference.model import CONFIG_FILE_NAME, GPT, WEIGHTS_FILE_NAME, load_checkpoint

CausalLM = GPT | Llama


def load_model(directory: Path, device: torch.device, dtype: torch.dtype) -> CausalLM:
    config_path = directory / CONFIG_FILE_NAME
    if not config_path.is_file() or not (directory / WEIGHTS_FILE_NAME).is_file():
        raise FileNotFoundError(f"checkpoint {directory} needs {CONFIG_FILE_NAME} and {WEIGHTS_FILE_NAME}")
    model_type = json.loads(config_path.read_text()).get("model_type", "gpt2")
    if model_type == "gpt2":
        return load_checkpoint(directory, device, dtype)
    if model_type == "llama":
        return load_llama_checkpoint(directory, device, dtype)
    raise ValueError(f"config.json model_type {model_type!r} is not supported; expected 'gpt2' or 'llama'")
