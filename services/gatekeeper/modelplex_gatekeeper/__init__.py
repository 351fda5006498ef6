"""The gatekeeper: who may call, how much, and what they used."""
