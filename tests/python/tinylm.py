"""The tiny language model the Python optimizer tests train (embedding, a linear layer with
bias, a LayerNorm, a bias-free head: both Celo2 and AdamW branches)."""
import torch


class TinyLM(torch.nn.Module):
    def __init__(self, vocab=17, width=8):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.fc = torch.nn.Linear(width, 2 * width)
        self.norm = torch.nn.LayerNorm(2 * width)
        self.head = torch.nn.Linear(2 * width, vocab, bias=False)

    def forward(self, x):
        return self.head(self.norm(torch.relu(self.fc(self.embed(x)))))
