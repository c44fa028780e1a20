"""Checkpoint conversion, verification and the `nomic-moe` command line for Nomic Embed v2 MoE."""
