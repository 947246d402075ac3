"""The knowledge base: pydantic models over config/ and the loader."""
