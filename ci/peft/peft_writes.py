#!/usr/bin/env python3
# Pinned reference stack (same as ci/peft/requirements.txt):
#   torch==2.15.0 transformers==5.24.0 peft==0.21.2 safetensors==0.8.0
"""Print what PEFT itself writes for a tiny GPT-2 prefix-tuning adapter: the
adapter_config.json text and the safetensors header of adapter_model.safetensors.

tests/it/adapter.rs (`files_are_byte_for_byte_what_peft_writes`) holds this output as its
golden values; rerun this after a PEFT upgrade and update the test and
`adapter::PEFT_FORMAT_VERSION` if it changed.

    /tmp/peftenv/bin/python ci/peft/peft_writes.py
"""

import struct
import tempfile
from pathlib import Path

import torch
from peft import PrefixTuningConfig, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel

torch.manual_seed(0)
cfg = GPT2Config(vocab_size=256, n_positions=128, n_embd=64, n_layer=2, n_head=4,
                 bos_token_id=0, eos_token_id=0)
for projection in (False, True):
    model = GPT2LMHeadModel(cfg)
    pc = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5,
                            encoder_hidden_size=32, prefix_projection=projection)
    with tempfile.TemporaryDirectory() as d:
        get_peft_model(model, pc).save_pretrained(d)
        print(f"--- prefix_projection={projection}: adapter_config.json")
        print((Path(d) / "adapter_config.json").read_text())
        raw = (Path(d) / "adapter_model.safetensors").read_bytes()
        n = struct.unpack("<Q", raw[:8])[0]
        print(f"--- adapter_model.safetensors header ({n} bytes, {len(raw)} in all)")
        print(repr(raw[8:8 + n].decode()))
