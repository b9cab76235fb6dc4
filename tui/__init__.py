"""The Textual chat app (`qwen-mlx chat`)."""
