"""Using a trained model: generation and evaluation from a checkpoint of any layout."""
