"""Models: CGCNN and attention layers, the saved-model format, the published checkpoints."""
