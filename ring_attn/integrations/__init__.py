"""Integrations with other libraries, each imported lazily by its own module (an optional
dependency is imported only when its integration is): `ring_attn.integrations.transformers`
for Hugging Face transformers (`pip install ring_attn[transformers]`)."""
