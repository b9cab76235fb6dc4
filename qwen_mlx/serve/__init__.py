"""`qwen-mlx serve`: the OpenAI and Anthropic HTTP APIs over one loaded model, with continuous batching."""
