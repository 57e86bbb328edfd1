"""Training-free defenses: the frozen base classifier wrapped at inference, nothing learned."""
