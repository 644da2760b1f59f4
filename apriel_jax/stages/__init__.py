"""The recipe's stages: depth upscaling (here), then averaging, realignment, CPT, SFT and merging."""
