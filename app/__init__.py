"""cfg-serve: classifier-free guidance diffusion inference service."""
