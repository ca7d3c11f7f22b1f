"""Device profiles, the memory planner and measured RAM (no torch)."""
