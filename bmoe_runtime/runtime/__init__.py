"""Running an exported model: session, generation loop, angle streaming (no torch)."""
