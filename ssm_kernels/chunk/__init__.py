"""The chunked engine shared by linear attention, Based-style variants and SSD (Mamba-2)."""
