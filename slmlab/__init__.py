"""slmlab utilities: data, tokenizer, config, training loop."""
