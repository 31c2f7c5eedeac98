"""Text-to-image with embedding arithmetic: SDXL text-encoder swap, the paper's T2I study, the world's own tiny diffusion model. Imports training and below."""
