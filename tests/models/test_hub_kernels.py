"""The Hugging Face kernels route (``KernelConfig(..., use_local_kernel=True)`` with the ``kernels`` package) is
closed in this environment; docs/models.md says why and keeps ``normlab.patch`` as the way. These checks hold
the facts that statement rests on: when one fails, transformers or kernels changed and the route deserves a
new look (and the docs a new paragraph)."""

from __future__ import annotations

import pytest
from transformers import KernelConfig, LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.utils import kernel_config as hf_kernel_config
from transformers.utils.import_utils import is_kernels_available


def test_transformers_accepts_no_cpu_entry_in_a_kernel_mapping():
    assert "cpu" not in hf_kernel_config.KERNELS_SUPPORTED_DEVICE_TYPES


def test_loading_with_a_local_kernel_config_fails_without_a_kernels_release_transformers_accepts(tmp_path):
    assert not is_kernels_available()  # transformers 5.23 asks for kernels >= 0.18.2, < 0.19
    assert not hasattr(LlamaRMSNorm, "kernel_layer_name")  # so its norms are not marked for the kernels library
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(tmp_path)
    config = KernelConfig({"RMSNorm": f"{tmp_path}:RMSNorm"}, use_local_kernel=True)
    with pytest.raises(RuntimeError, match="LocalLayerRepository requires `kernels` to be installed"):
        LlamaForCausalLM.from_pretrained(tmp_path, kernel_config=config)
