"""Video tokenizers (registered kind ``tokenizer``)."""
