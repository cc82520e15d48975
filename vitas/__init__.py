"""vitas: one-shot supernet architecture search for Vision Transformers (command line on top)."""
