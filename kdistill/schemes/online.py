"""Online distillation (placeholder until written)."""
