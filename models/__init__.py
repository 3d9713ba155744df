"""Models that Sluice knows: the networks, their registry and the tensor wire format."""
