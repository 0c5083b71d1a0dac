"""Serving export after training: the fine-tuned weights as a GGUF file (`gguf_file`) and an Ollama Modelfile
(`modelfile`), under final/gguf/ (`hook` runs it on rank 0 after the regular export)."""
