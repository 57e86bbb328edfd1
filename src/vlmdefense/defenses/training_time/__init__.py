"""Training-time defenses: the model (or a prompt) is trained adversarially before deployment."""
