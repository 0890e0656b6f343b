"""torch modules: the decoder, generation with a KV cache, export to Hugging Face format."""
