"""The decoder LLM: any Hugging Face causal LM directory. Our default is a tiny Qwen2, built here
and pretrained as a multilingual text LM (speechllm.pretrain), saved as a normal HF directory so
that the very same weights load in vLLM."""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase, Qwen2Config, Qwen2ForCausalLM

from speechllm.prompt import END_OF_TEXT


@dataclass
class LLMDims:
    hidden_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 768
    max_position_embeddings: int = 512


def new_qwen2(tokenizer: PreTrainedTokenizerBase, dims: LLMDims | None = None) -> Qwen2ForCausalLM:
    dims = dims or LLMDims()
    eos = tokenizer.convert_tokens_to_ids(END_OF_TEXT)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=dims.hidden_size,
                         num_hidden_layers=dims.num_hidden_layers, num_attention_heads=dims.num_attention_heads,
                         num_key_value_heads=dims.num_key_value_heads, intermediate_size=dims.intermediate_size,
                         max_position_embeddings=dims.max_position_embeddings, tie_word_embeddings=True,
                         bos_token_id=eos, eos_token_id=eos, pad_token_id=eos, rope_theta=10000.0)
    return Qwen2ForCausalLM(config)
