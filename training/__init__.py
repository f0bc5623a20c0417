"""Training: the Rank-FT backbone W_init (CRAFT-LoRA Eq. 1-4) and routed content / style LoRAs (Eq. 6-7)."""
