"""charrnn: train character-level LSTM language models on any text and sample new text from them."""

__version__ = "0.1.0"
