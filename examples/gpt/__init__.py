"""A small GPT in plain PyTorch and a plain-text corpus, for the celo2 demo."""
