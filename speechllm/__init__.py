"""The Speech-LLM: audio decoding, features, encoder, projector, LLM, prompt, decoding and LID."""
